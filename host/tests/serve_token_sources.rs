//! `azgate serve` gets its tokens from the configured `token_source`: a workload identity here,
//! exchanged at the (emulated) Entra authority, through the in-process token service the
//! filter's call-outs reach. The filter is a small WAT module that makes the call-out the real
//! filter makes (`GET /metadata/identity/oauth2/token?…&msi_res_id=…`, `Metadata: true`, to
//! `azgate_msi`) and answers the request with the call-out's status and body.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail on purpose"
)]

use std::net::SocketAddr;
use std::time::Duration;

use azgate::config::ServeConfig;
use azgate::serve::start;
use azgate_emulator::{Emulator, TENANT_ID};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

const MIRID: &str = "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
const READER_CLIENT_ID: &str = "bbbbbbbb-0000-0000-0000-000000000002";
const DEFAULT_CLIENT_ID: &str = "aaaaaaaa-0000-0000-0000-000000000001";

/// proxy-wasm's serialized header map.
fn header_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut bytes = (pairs.len() as u32).to_le_bytes().to_vec();
    for (key, value) in pairs {
        bytes.extend((key.len() as u32).to_le_bytes());
        bytes.extend((value.len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        bytes.extend(key.as_bytes());
        bytes.push(0);
        bytes.extend(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// A filter that asks `azgate_msi` for `path` on every request and answers with the result.
fn call_out_filter(path: &str) -> String {
    let headers = header_map(&[
        (":method", "GET"),
        (":path", path),
        (":authority", "azgate_msi"),
        ("metadata", "true"),
    ]);
    let data: String = headers.iter().map(|b| format!("\\{b:02x}")).collect();
    format!(
        r#"(module
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $context (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $http_context (mut i32) (i32.const 0))
  (data (i32.const 100) "azgate_msi")
  (data (i32.const 1024) "{data}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $context i32) (param i32 i32) (result i32)
    (global.set $http_context (local.get $context))
    ;; headers at 1024, no body, empty trailers (the zeroes at 300), 5 s, token to 320
    (if (call $call (i32.const 100) (i32.const 10) (i32.const 1024) (i32.const {len})
                    (i32.const 0) (i32.const 0) (i32.const 300) (i32.const 4)
                    (i32.const 5000) (i32.const 320))
      (then
        (drop (call $local (i32.const 500) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                           (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 1))))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32) (param $body i32) (param i32)
    (drop (call $context (global.get $http_context)))
    (drop (call $buffer (i32.const 4) (i32.const 0) (local.get $body) (i32.const 200) (i32.const 204)))
    (drop (call $local (i32.const 200) (i32.const 0) (i32.const 0)
                       (i32.load (i32.const 200)) (i32.load (i32.const 204))
                       (i32.const 0) (i32.const 0) (i32.const -1)))))"#,
        len = headers.len()
    )
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn get(url: &str) -> (u16, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(http::Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exchanges_a_workload_identity_token_for_the_filters_call_out() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("azgate-serve-token-sources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let resource = "https%3A%2F%2Fmanagement.azure.com%2F";
    let encoded: String = form_urlencoded::byte_serialize(MIRID.as_bytes()).collect();
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}&msi_res_id={encoded}"
    );
    std::fs::write(
        dir.join("filter.wasm"),
        wat::parse_str(call_out_filter(&path)).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("federated-token"),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln\n",
    )
    .unwrap();
    let (listen, admin) = (free_port(), free_port());
    // Every path relative to the file; the allow-list and the client-id map as deployed.
    let yaml = format!(
        "workers: 1\n\
         listeners:\n  - name: front\n    address: {listen}\n    plaintext_behind_trusted_front: true\n\
         admin:\n  address: {admin}\n\
         filter:\n  path: filter.wasm\n\
         clusters:\n  azgate_msi: {{token_service: true}}\n\
         token_source:\n\
         \x20 source: workload-identity\n\
         \x20 authority_host: {authority}\n\
         \x20 tenant_id: {TENANT_ID}\n\
         \x20 client_id: {DEFAULT_CLIENT_ID}\n\
         \x20 federated_token_file: federated-token\n\
         \x20 allow_identities: ['msi_res_id={MIRID}']\n\
         \x20 identity_client_ids:\n\
         \x20   '{MIRID}': {READER_CLIENT_ID}\n",
        authority = emulator.base_url(),
    );
    std::fs::write(dir.join("azgate.yaml"), yaml).unwrap();
    let config = ServeConfig::load(&dir.join("azgate.yaml")).expect("valid configuration");
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = start(config, stop_rx).await.expect("gateway starts");
    let mut ready = false;
    for _ in 0..200 {
        if get(&format!("http://{admin}/ready")).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "the admin listener never said LIVE");

    let (status, body) = get(&format!("http://{listen}/any")).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = answer["access_token"].as_str().unwrap();
    assert_eq!(claims(token)["appid"], READER_CLIENT_ID);
    // (Whether the slash survives the v2 scope is the resource/scope table's business.)
    assert!(
        claims(token)["aud"]
            .as_str()
            .unwrap()
            .starts_with("https://management.azure.com"),
        "{token}"
    );
    assert_eq!(answer["msi_res_id"], MIRID);

    // It was exchanged at the authority, with the federated token, for the mapped client id.
    let exchanges = emulator.requests();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    assert_eq!(exchanges[0].method, "POST");
    assert_eq!(
        exchanges[0].path(),
        format!("/{TENANT_ID}/oauth2/v2.0/token")
    );
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(exchanges[0].body.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(form["client_id"], READER_CLIENT_ID);
    assert_eq!(
        form["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln"
    );

    // Cached: a second request makes no exchange; the admin metrics show the token service.
    assert_eq!(get(&format!("http://{listen}/again")).await.0, 200);
    assert_eq!(emulator.requests().len(), 1);
    let (_, metrics) = get(&format!("http://{admin}/metrics")).await;
    assert!(
        metrics.contains("azgate_token_cache_hits_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("key=\"workload_identity client_id=bbbbbbbb-0000-0000-0000-000000000002"),
        "{metrics}"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("workers stop after the stop signal");
    let _ = std::fs::remove_dir_all(dir);
}
