//! The filter's per-request work, natively, on the Go-made Teleport certificate in
//! `tests/fixtures/teleport-go/`: parsing the XFCC certificate, verifying the proof-of-possession
//! JWT (first time, and remembered), the whole decision warm and cold, RBAC with 1 and 100 roles
//! held, and the endpoint check. `make bench-micro` (or `cargo bench -p azgate-microbench`).

#![expect(
    clippy::expect_used,
    reason = "set-up that fails (a missing fixture, a refused request) must stop the benchmark"
)]

use std::hint::black_box;
use std::path::PathBuf;

use azgate_filter::config::Config;
use azgate_filter::decision::{VerificationCache, decide_header_map};
use azgate_filter::identity::{self, AppIdentity};
use azgate_filter::jwt;
use azgate_filter::policy::IdentityId;
use criterion::{Criterion, criterion_group, criterion_main};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/azgate-tests/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

struct Fixture {
    xfcc: String,
    token: String,
    cert: AppIdentity,
    now: i64,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/teleport-go")
}

fn fixture() -> Fixture {
    let dir = fixture_dir();
    let pem = std::fs::read_to_string(dir.join("app-p256.pem")).expect("fixture certificate");
    let key = std::fs::read(dir.join("app-p256.key")).expect("fixture key");
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let xfcc = format!(
        "Cert=\"{}\"",
        percent_encoding::utf8_percent_encode(&pem, ESCAPED)
    );
    let cert = identity::certificate_from_xfcc(&[&xfcc]).expect("the fixture parses");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("JWT".into());
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"resource": "https://management.azure.com/", "tid": "t"}),
        &jsonwebtoken::EncodingKey::from_ec_pem(&key).expect("fixture key is PKCS#8 P-256"),
    )
    .expect("signing");
    let now = cert.not_before + 60;
    Fixture {
        xfcc,
        token,
        cert,
        now,
    }
}

/// The filter's configuration with the certificate's roles allowing the reader identity, and
/// `decoys` more roles allowing other identities.
fn config(roles: &[String], decoys: usize) -> Config {
    let mut list: Vec<serde_json::Value> = roles
        .iter()
        .map(|name| {
            serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": name},
                               "spec": {"allow": {"azure_identities": [READER]}}})
        })
        .collect();
    for i in 0..decoys {
        list.push(serde_json::json!({"kind": "role", "version": "v7",
            "metadata": {"name": format!("decoy-{i}")},
            "spec": {"allow": {"azure_identities": [format!("{READER}-{i}")]}}}));
    }
    Config::parse(serde_json::json!({"roles": list}).to_string().as_bytes()).expect("config")
}

fn hot_path(c: &mut Criterion) {
    let f = fixture();
    let config = config(&f.cert.roles, 99);
    let pairs: Vec<(String, Vec<u8>)> = [
        (":method", "GET".to_string()),
        (":path", "/subscriptions?api-version=2022-12-01".into()),
        (":authority", "management.azure.com".into()),
        ("x-forwarded-host", "management.azure.com".into()),
        ("authorization", format!("Bearer {}", f.token)),
        ("x-forwarded-client-cert", f.xfcc.clone()),
        ("user-agent", "AZURECLI/2.91.0".into()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.into_bytes()))
    .collect();

    c.bench_function(
        "certificate: parse XFCC (URL-decode, X.509, Teleport fields)",
        |b| b.iter(|| identity::certificate_from_xfcc(&[black_box(&f.xfcc)])),
    );
    c.bench_function("jwt: verify ES256, first time", |b| {
        b.iter(|| jwt::verify(black_box(&f.token), &f.cert.public_key))
    });
    let mut warm = VerificationCache::new(1024);
    let (_, first) = decide_header_map(&pairs, &config, f.now, &mut warm);
    assert!(first.is_ok(), "the fixture request is granted: {first:?}");
    c.bench_function(
        "decide: whole request, certificate and JWT remembered",
        |b| b.iter(|| decide_header_map(black_box(&pairs), &config, f.now, &mut warm)),
    );
    c.bench_function("decide: whole request, nothing remembered", |b| {
        b.iter(|| {
            let mut cold = VerificationCache::new(0);
            decide_header_map(black_box(&pairs), &config, f.now, &mut cold)
        })
    });
    let selected = IdentityId::parse(READER).expect("identity");
    for held in [1usize, 100] {
        let mut roles: Vec<String> = (0..held.saturating_sub(1))
            .map(|i| format!("decoy-{i}"))
            .collect();
        roles.push(f.cert.roles[0].clone());
        c.bench_function(&format!("rbac: {held} role(s) held"), |b| {
            b.iter(|| {
                config.roles.check(
                    black_box(&roles),
                    &f.cert.traits,
                    &selected,
                    &f.cert.allowed_identities,
                )
            })
        });
    }
    c.bench_function("endpoint: X-Forwarded-Host against the allow-list", |b| {
        b.iter(|| {
            config
                .endpoints
                .target(black_box(&["management.azure.com"]))
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
