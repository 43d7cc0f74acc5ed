//! `azgate serve` end to end with a small purpose-built filter (WAT): a trap fails that request
//! closed (503, Azure-style JSON), the VM is replaced and the next request is served; readiness
//! and Prometheus metrics on the admin listener; the plaintext "behind a trusted TLS front"
//! mode; connection limits; stopping (no new connections, requests in flight drained); and
//! configuration errors that name their field.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail on purpose"
)]

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use azgate::config::ServeConfig;
use azgate::config::teleport::read_role_file;
use azgate::serve::start;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

/// Answers every request locally with 200 "ok"; traps when the request has `x-trap`; echoes
/// its client certificate header presence as `x-saw-xfcc`.
const FILTER: &str = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (data (i32.const 100) "x-trap")
  (data (i32.const 120) "ok")
  (data (i32.const 140) "x-forwarded-client-cert")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 8) (i32.const 12)))
      (then unreachable))
    ;; 200 when a client XFCC survived (trusted front), 201 when none did.
    (drop (call $local
      (select (i32.const 200) (i32.const 201)
        (i32.eqz (call $get (i32.const 0) (i32.const 140) (i32.const 23) (i32.const 8) (i32.const 12))))
      (i32.const 0) (i32.const 0) (i32.const 120) (i32.const 2) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1)))"#;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_config(dir: &std::path::Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("azgate.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    path
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("azgate-serve-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Starts the gateway of `path` and waits until its admin listener says LIVE.
/// `azgate.yaml` in `dir` for one worker with a plaintext (trusted-front) listener, an admin
/// listener and `filter.wasm`; returns both addresses and the file.
fn plaintext_gateway(dir: &std::path::Path) -> (SocketAddr, SocketAddr, std::path::PathBuf) {
    let (listen, admin) = (free_port(), free_port());
    let path = write_config(
        dir,
        &format!(
            "workers: 1\nlisteners:\n  - name: front\n    address: {listen}\n    plaintext_behind_trusted_front: true\n\
             admin:\n  address: {admin}\nfilter:\n  path: filter.wasm\n"
        ),
    );
    (listen, admin, path)
}

async fn start_ready(
    path: &std::path::Path,
    admin: SocketAddr,
) -> (azgate::serve::Running, watch::Sender<bool>) {
    let config = ServeConfig::load(path).expect("valid configuration");
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = start(config, stop_rx).await.expect("gateway starts");
    for _ in 0..100 {
        if get(&format!("http://{admin}/ready"), &[]).await.0 == 200 {
            return (running, stop_tx);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the admin listener never said LIVE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_closed_the_vm_is_replaced_and_metrics_show_it() {
    let dir = temp_dir("trap");
    std::fs::write(dir.join("filter.wasm"), wat::parse_str(FILTER).unwrap()).unwrap();
    let (listen, admin, path) = plaintext_gateway(&dir);
    let (running, stop_tx) = start_ready(&path, admin).await;
    let base = format!("http://{listen}");

    let (status, _, body) = get(
        &format!("{base}/a"),
        &[("x-forwarded-client-cert", "Hash=1")],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "behind a trusted front the XFCC is kept"
    );
    assert_eq!(get(&format!("{base}/a"), &[]).await.0, 201);

    let (status, headers, body) = get(&format!("{base}/trap"), &[("x-trap", "1")]).await;
    assert_eq!(status, 503);
    assert!(headers.contains(&("x-azgate-error".into(), "FilterFailed".into())));
    let json: serde_json::Value = serde_json::from_str(&body).expect("Azure-style JSON");
    assert_eq!(json["error"]["code"], "FilterFailed");
    assert!(
        !body.contains("unreachable"),
        "trap details stay in the log: {body}"
    );

    // The replacement VM serves the next request.
    assert_eq!(get(&format!("{base}/after"), &[]).await.0, 201);

    let (_, _, metrics) = get(&format!("http://{admin}/metrics"), &[]).await;
    assert!(metrics.contains("azgate_vm_restarts_total 1"), "{metrics}");
    assert!(
        metrics.contains("azgate_requests_total{decision=\"error\",code=\"FilterFailed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("azgate_requests_total{decision=\"deny\",code=\"LocalResponse\"} 3"),
        "{metrics}"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("workers stop after the stop signal");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn configuration_errors_name_the_field() {
    let dir = temp_dir("config");
    let cases = [
        ("listeners: []\nfilter: {path: x.wasm}\n", "listeners"),
        (
            "listeners: [{address: '127.0.0.1:0'}]\nfilter: {path: x.wasm}\n",
            "listeners[0].tls",
        ),
        (
            "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\nfilter: {path: x.wasm}\nclusters: {azgate_msi: {}}\n",
            "clusters.azgate_msi",
        ),
        (
            "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\nfilter: {path: x.wasm}\nworkerz: 2\n",
            "unknown field `workerz`",
        ),
    ];
    for (yaml, field) in cases {
        let path = write_config(&dir, yaml);
        let error = ServeConfig::load(&path)
            .expect_err("invalid configuration")
            .to_string();
        assert!(error.contains(field), "{error:?} should name {field}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn teleport_role_files_are_appended_to_the_filter_roles() {
    let dir = temp_dir("roles");
    std::fs::write(
        dir.join("roles.yaml"),
        "kind: role\nversion: v7\nmetadata:\n  name: azure-reader\nspec:\n  allow:\n    app_labels: {'*': '*'}\n    azure_identities:\n      - /subscriptions/0/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader\n---\nkind: role\nversion: v6\nmetadata:\n  name: lockdown\nspec:\n  deny:\n    azure_identities: ['*']\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "kind: user\nversion: v2\nmetadata: {name: alice}\n",
    )
    .unwrap();
    let path = write_config(
        &dir,
        "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\n\
         filter:\n  path: x.wasm\n  config: {clock_skew_s: 30, roles: [{metadata: {name: inline}}]}\n  role_files: [roles.yaml]\n",
    );
    let config = ServeConfig::load(&path).expect("valid");
    let plugin: serde_json::Value =
        serde_json::from_slice(&config.plugin_config().unwrap()).unwrap();
    let names: Vec<&str> = plugin["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["inline", "azure-reader", "lockdown"]);
    assert_eq!(plugin["clock_skew_s"], 30);
    let bad = write_config(
        &dir,
        "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\nfilter:\n  path: x.wasm\n  role_files: [bad.yaml]\n",
    );
    let error = ServeConfig::load(&bad)
        .unwrap()
        .plugin_config()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("bad.yaml") && error.contains("expected \"role\""),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Lock files and directories as `tctl get locks` writes them are appended to the plugin's
/// `locks`; a bad lock names its file.
#[test]
fn teleport_lock_files_and_directories_are_appended_to_the_filter_locks() {
    let dir = temp_dir("locks");
    std::fs::create_dir_all(dir.join("locks.d")).unwrap();
    std::fs::write(
        dir.join("alice.yaml"),
        "kind: lock\nversion: v2\nmetadata:\n  name: alice\nspec:\n  target:\n    user: alice\n  message: offboarding\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("locks.d/b.json"),
        r#"[{"kind": "lock", "version": "v2", "metadata": {"name": "ops"}, "spec": {"target": {"role": "ops"}, "expires": "2999-01-01T00:00:00Z"}}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("locks.d/a.yml"),
        "kind: lock\nversion: v2\nmetadata: {name: root}\nspec: {target: {login: root}}\n",
    )
    .unwrap();
    std::fs::write(dir.join("locks.d/notes.txt"), "not a lock").unwrap();
    let path = write_config(
        &dir,
        "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\n\
         filter:\n  path: x.wasm\n  config: {roles: []}\n  lock_files: [alice.yaml, locks.d]\n",
    );
    let config = ServeConfig::load(&path).expect("valid");
    let plugin: serde_json::Value =
        serde_json::from_slice(&config.plugin_config().unwrap()).unwrap();
    let names: Vec<&str> = plugin["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "root", "ops"]);
    let parsed = azgate_filter::config::Config::parse(&config.plugin_config().unwrap()).unwrap();
    assert_eq!(parsed.locks.len(), 2);
    assert_eq!(parsed.locks.ignored(), ["root"]);
    std::fs::write(
        dir.join("locks.d/c.yaml"),
        "kind: lock\nmetadata: {name: x}\nspec: {target: {user: a}, expires: soon}\n",
    )
    .unwrap();
    let error = config.plugin_config().unwrap_err().to_string();
    assert!(
        error.contains("c.yaml") && error.contains("spec.expires"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `tctl get roles` (YAML documents) and `tctl get roles --format=json` (an array; the JSON
/// fixture is the YAML one converted) load unchanged, preset roles included, with one rule set:
/// versions v3 to v8, templates allowed.
#[test]
fn role_files_load_as_tctl_writes_them() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/teleport");
    let yaml = read_role_file(&fixtures.join("preset-roles.yaml")).expect("YAML loads");
    let json = read_role_file(&fixtures.join("preset-roles.json")).expect("JSON loads");
    assert_eq!(yaml, json);
    let names: Vec<&str> = yaml
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["access", "editor", "auditor"]);
    let roles = azgate_filter::config::parse_roles(yaml).unwrap();
    let alice: azgate_filter::template::Traits = [(
        "azure_identities".to_string(),
        vec![
            "/subscriptions/0/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader"
                .to_string(),
        ],
    )]
    .into();
    let all = ["access", "editor", "auditor"].map(String::from);
    assert_eq!(roles.allowed_identities(&all, &alice).len(), 1);
    assert!(roles.allowed_identities(&all[1..], &alice).is_empty());

    // The same roles inline in `filter.config.roles` and from a role file make the same plugin
    // configuration, which the filter accepts: a v8 role and `tctl`'s JSON array included.
    let dir = temp_dir("role-inline-and-file");
    let v8 = serde_json::json!({
        "kind": "role", "version": "v8", "metadata": {"name": "azure-v8"},
        "spec": {"allow": {"app_labels": {"*": "*"}, "azure_identities": ["{{internal.azure_identities}}"]}}
    });
    let mut all = json.clone();
    all.push(v8);
    std::fs::write(dir.join("roles.json"), serde_json::to_string(&all).unwrap()).unwrap();
    let listener = "listeners: [{address: '127.0.0.1:0', plaintext_behind_trusted_front: true}]\n";
    let from_file = ServeConfig::load(&write_config(
        &dir,
        &format!("{listener}filter:\n  path: x.wasm\n  role_files: [roles.json]\n"),
    ))
    .expect("role file config");
    let inline = ServeConfig::load(&write_config(
        &dir,
        &format!(
            "{listener}filter:\n  path: x.wasm\n  config: {{roles: {}}}\n",
            serde_json::to_string(&all).unwrap()
        ),
    ))
    .expect("inline config");
    let (file_bytes, inline_bytes) = (
        from_file.plugin_config().unwrap(),
        inline.plugin_config().unwrap(),
    );
    assert_eq!(file_bytes, inline_bytes);
    let parsed = azgate_filter::config::Config::parse(&file_bytes).expect("the filter accepts it");
    assert_eq!(parsed.roles.len(), 4);
    let _ = std::fs::remove_dir_all(dir);

    let dir = temp_dir("role-versions");
    for (i, (text, ok)) in [
        ("{kind: role, version: v3, metadata: {name: a}}", true),
        ("[{kind: role, version: v8, metadata: {name: a}}, {kind: role, version: v4, metadata: {name: b}}]", true),
        ("{\"kind\": \"role\", \"version\": \"v5\", \"metadata\": {\"name\": \"a\"}}", true),
        ("{kind: role, version: v9, metadata: {name: a}}", false),
        ("{kind: role, version: v2, metadata: {name: a}}", false),
        ("{kind: role, version: v7, metadata: {name: a}, spec: {allow: {azure_identities: ['{{internal.nope}}']}}}", false),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("role-{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_role_file(&path).is_ok(), ok, "{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = temp_dir("limit");
    std::fs::write(dir.join("filter.wasm"), wat::parse_str(FILTER).unwrap()).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = write_config(
        &dir,
        &format!(
            "workers: 2\nlisteners:\n  - name: front\n    address: {listen}\n    plaintext_behind_trusted_front: true\n    max_connections: 2\n\
             admin:\n  address: {admin}\nfilter:\n  path: filter.wasm\n"
        ),
    );
    let (running, stop_tx) = start_ready(&path, admin).await;
    let request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    // Two open connections fill the listener (whichever workers accepted them).
    let mut first = tokio::net::TcpStream::connect(listen).await.unwrap();
    let second = tokio::net::TcpStream::connect(listen).await.unwrap();
    // Each is served: a request on the first gets its answer.
    first.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut answer));
    read.await.expect("answered").unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(first);
    // The first slot frees when its connection ends; take it again, then the third is refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _refill = tokio::net::TcpStream::connect(listen).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(listen).await.unwrap();
    let _ = third.write_all(request).await;
    let mut refused = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut refused));
    let outcome = read.await.expect("closed at once, not left waiting");
    assert!(
        outcome.map(|n| n == 0).unwrap_or(true),
        "closed without an answer: {}",
        String::from_utf8_lossy(&refused)
    );
    let (_, _, metrics) = get(&format!("http://{admin}/metrics"), &[]).await;
    assert!(
        metrics.contains("azgate_connections_refused_total 1"),
        "{metrics}"
    );
    drop(second);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("workers stop after the stop signal");
    let _ = std::fs::remove_dir_all(dir);
}

/// Lets every request through (`proxy_on_request_headers` returns Continue), so it is forwarded.
const PASS_THROUGH: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#;

/// A TLS upstream for `name` that answers each request 200 "slow" after `delay`.
async fn slow_upstream(dir: &std::path::Path, name: &str, delay: Duration) -> SocketAddr {
    use azgate::pki::{AppKey, CertificateAuthority, KeyKind};
    use rustls::pki_types::pem::PemObject;

    let ca = CertificateAuthority::generate("drain test CA", Duration::from_secs(3600)).unwrap();
    std::fs::write(dir.join("upstream-ca.crt"), ca.cert_pem()).unwrap();
    let key = AppKey::generate(KeyKind::P256).unwrap();
    let now = std::time::SystemTime::now();
    let cert_pem = ca
        .issue_server(
            &[name],
            &[],
            key.public_key_info().unwrap(),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.to_pem().unwrap().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_request| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"slow")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_refuses_new_connections_and_drains_requests_in_flight() {
    let dir = temp_dir("drain");
    std::fs::write(
        dir.join("filter.wasm"),
        wat::parse_str(PASS_THROUGH).unwrap(),
    )
    .unwrap();
    let upstream = slow_upstream(&dir, "slow.azure.test", Duration::from_millis(800)).await;
    let (listen, admin) = (free_port(), free_port());
    let path = write_config(
        &dir,
        &format!(
            "workers: 1\nlisteners:\n  - name: front\n    address: {listen}\n    plaintext_behind_trusted_front: true\n\
             admin:\n  address: {admin}\nfilter:\n  path: filter.wasm\n\
             upstream:\n  extra_ca: [upstream-ca.crt]\n  resolve: {{slow.azure.test: \"{upstream}\"}}\n"
        ),
    );
    let (running, stop_tx) = start_ready(&path, admin).await;
    let url = format!("http://{listen}/long");
    let in_flight = tokio::spawn(async move { get(&url, &[("host", "slow.azure.test")]).await });
    // The request is with the upstream when the stop comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(listen),
    )
    .await
    .expect("connect answers at once");
    assert!(refused.is_err(), "no new connections after the stop");

    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "slow"),
        "the request in flight finished"
    );
    tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("workers stop once drained");
    let _ = std::fs::remove_dir_all(dir);
}

/// The private compiled-code directories of this test process.
fn private_code_dirs() -> Vec<std::path::PathBuf> {
    let prefix = format!("azgate-serve-code-{}-", std::process::id());
    let mut found: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azgate_binary_compiles_the_filter_in_a_child_and_leaves_no_cache_behind() {
    let dir = temp_dir("child-compile");
    std::fs::write(dir.join("filter.wasm"), wat::parse_str(FILTER).unwrap()).unwrap();
    let (listen, _, path) = plaintext_gateway(&dir);
    assert!(private_code_dirs().is_empty());
    let config = ServeConfig::load(&path).expect("valid configuration");
    let (stop_tx, stop_rx) = watch::channel(false);
    let compiler = azgate::serve::Compiler::ChildProcess(env!("CARGO_BIN_EXE_azgate").into());
    let running = azgate::serve::start_with(config, stop_rx, compiler)
        .await
        .expect("gateway starts");
    // The child compiled it (a failed child leaves it to this process, which says so), and
    // the private cache it compiled into is gone once the code is loaded.
    assert_eq!(running.compiled_by(), "child process");
    assert!(private_code_dirs().is_empty(), "{:?}", private_code_dirs());
    assert_eq!(get(&format!("http://{listen}/a"), &[]).await.0, 201);
    // Nor does the cache's background worker (usage counters) bring it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(private_code_dirs().is_empty(), "{:?}", private_code_dirs());
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("workers stop after the stop signal");
    let _ = std::fs::remove_dir_all(dir);
}
