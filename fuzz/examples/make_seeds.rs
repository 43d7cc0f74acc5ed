//! Writes the checked-in seeds, `corpus/<target>/seed-*`, for the byte-level targets from the
//! fixtures (real certificates, signed tokens, configurations):
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_seeds`.
//! The structured targets (`xfcc_structured`, `jws_signed`, `decide`) build their inputs from
//! the fixtures themselves and start from an empty corpus.

use std::path::Path;

use azgate_fuzz::{Which, fixtures, pem_body, url_encode};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
}

fn main() {
    let fx = fixtures();

    for (which, name) in [(Which::P256, "p256"), (Which::Rsa, "rsa")] {
        let cert = fx.cert(which);
        write(
            "xfcc_certificate",
            &format!("serve-{name}"),
            fx.xfcc(which).as_bytes(),
        );
        let envoy = format!(
            "By=spiffe://azgate.test/gateway;Hash={};Cert=\"{}\";Subject=\"CN=alice,O=azure-reader\";URI=;DNS=alice.test",
            cert.hash_hex,
            url_encode(cert.pem)
        );
        write(
            "xfcc_certificate",
            &format!("envoy-{name}"),
            envoy.as_bytes(),
        );
        write(
            "xfcc_certificate",
            &format!("pem-{name}"),
            cert.pem.as_bytes(),
        );
        write(
            "xfcc_certificate",
            &format!("der-{name}"),
            &pem_body(cert.pem),
        );
    }
    let injected = format!(
        "Hash={};Cert=\"{}\";URI=x;Cert=\"{}\"",
        fx.p256.hash_hex,
        url_encode(fx.p256.pem),
        url_encode(fx.rsa.pem)
    );
    write(
        "xfcc_certificate",
        "injected-second-cert",
        injected.as_bytes(),
    );

    for (i, (_, token)) in fx.tokens.iter().enumerate() {
        write("jws_verify", &format!("token-{i}"), token.as_bytes());
        write(
            "jws_verify",
            &format!("bearer-{i}"),
            format!("Bearer {token}").as_bytes(),
        );
    }

    for (i, json) in fx.config_json.iter().enumerate() {
        write("plugin_config", &format!("config-{i}"), json.as_bytes());
    }
    let every_field = serde_json::json!({
        "roles": [{"kind": "role", "version": "v8", "metadata": {"name": "r"},
                   "spec": {"allow": {"azure_identities": [azgate_fuzz::IDENTITY]},
                            "deny": {"azure_identities": ["*"]}}}],
        "clouds": ["public", "usgov", "china"], "token_cluster": "azgate_msi",
        "token_authority": "169.254.169.254", "token_timeout_ms": 5000,
        "token_expiry_margin_s": 300, "allow_unauthenticated": false, "max_token_bytes": 8192,
        "clock_skew_s": 60, "verified_token_cache_size": 1024, "token_wait_poll_ms": 10
    });
    write(
        "plugin_config",
        "every-field",
        every_field.to_string().as_bytes(),
    );

    let request: Vec<(&str, String)> = vec![
        (":method", "GET".into()),
        (":path", "/subscriptions?api-version=2022-12-01".into()),
        (":authority", "gateway.test".into()),
        ("x-forwarded-client-cert", fx.xfcc(Which::P256)),
        ("authorization", format!("Bearer {}", fx.tokens[0].1)),
        ("x-forwarded-host", "management.azure.com".into()),
    ];
    write("header_map", "request", &serialize_pairs(&request));
    write(
        "header_map",
        "one-pair",
        &serialize_pairs(&[(":status", "200".to_string())]),
    );

    let deploy = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/azgate.yaml"))
        .expect("deploy/azgate.yaml");
    write("azgate_yaml", "deploy", &deploy);
    let inline = format!(
        r#"workers: 2
listeners:
  - name: front
    address: 127.0.0.1:0
    plaintext_behind_trusted_front: true
  - address: "[::1]:8443"
    max_connections: 10
    tls: {{cert: gw.crt, key: gw.key, client_ca: [ca.crt], client_certificate: optional}}
admin: {{address: 127.0.0.1:9901}}
filter:
  path: azgate_filter.wasm
  config: {}
clusters:
  azgate_msi: {{token_service: true}}
  other: {{address: 127.0.0.1:50342}}
token_source: {{imds_endpoint: http://127.0.0.1:1}}
upstream:
  resolve: {{management.azure.com: 127.0.0.1:9443}}
  connect_timeout_ms: 100
  request_timeout_ms: 1000
  max_request_body_bytes: 1024
"#,
        fx.config_json[1]
    );
    write("azgate_yaml", "inline-roles", inline.as_bytes());
}

/// The proxy-wasm pair layout (as `azgate_wasmhost::serialize_pairs` writes it; written out here
/// so this example builds without wasmtime).
fn serialize_pairs(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}
