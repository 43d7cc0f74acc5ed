//! The ABI probe filter (`tests/probe`) in this host alone, for what needs no Envoy to check:
//! which header maps each callback is offered, with the statuses Envoy 1.40 gave the same probe
//! (`make test-probe` compares the two hosts end to end). Needs `make probe`.

#![allow(clippy::expect_used, reason = "test helpers fail the test on purpose")]

mod common;

use azgate_wasmhost::{Action, CallResponse, Plugin, PluginOptions, SharedStores, StreamInfo};

fn probe_wasm() -> Vec<u8> {
    common::built_wasm("AZGATE_PROBE_WASM", "azgate_probe.wasm", "probe")
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// What one callback could do, in the probe's words: (status of getting a request header,
/// pairs non-empty, status of replacing one; the same for the response map; status of getting
/// a call-out answer header; `request.path` present).
type Offer = (u64, bool, u64, u64, bool, u64, u64, bool);

fn offer(phase: &serde_json::Value) -> Offer {
    let n = |key: &str| phase[key].as_u64().expect("a status");
    let non_empty = |key: &str| phase[key][1].as_bool().expect("pairs: [status, non-empty]");
    (
        n("request_get"),
        non_empty("request_pairs"),
        n("request_replace"),
        n("response_get"),
        non_empty("response_pairs"),
        n("response_replace"),
        n("call_get"),
        !phase["request.path"].is_null(),
    )
}

#[test]
fn header_maps_are_offered_when_envoy_offers_them() {
    let plugin = Plugin::load(
        &probe_wasm(),
        PluginOptions {
            name: "probe".into(),
            root_id: "probe".into(),
            vm_id: "probe".into(),
            plugin_config: b"{}".to_vec(),
            vm_config: Vec::new(),
            clusters: vec!["azgate_msi".into()],
            log_level: 2,
            cache_dir: None,
        },
        SharedStores::default(),
    )
    .expect("probe loads");
    let mut vm = plugin.start_vm().expect("VM starts");
    let id = vm
        .create_stream(
            headers(&[
                (":authority", "gateway"),
                (":path", "/probe-phases"),
                (":method", "GET"),
                (":scheme", "https"),
                ("x-probe", "phases"),
            ]),
            StreamInfo::default(),
        )
        .expect("stream");
    assert_eq!(
        vm.on_request_headers(id, true).expect("headers"),
        Action::Pause
    );
    let call = vm.take_effects().calls.pop().expect("a call-out");
    vm.on_http_call_response(
        call.token,
        CallResponse {
            headers: headers(&[(":status", "200")]),
            body: b"{}".to_vec(),
            trailers: Vec::new(),
        },
    )
    .expect("call-out answer");
    vm.take_effects();
    vm.on_response_headers(id, headers(&[(":status", "200")]), false)
        .expect("response headers");
    vm.finish_stream(id).expect("end of stream");

    let (bytes, _) = plugin
        .shared_data()
        .get("probe.phases")
        .expect("the probe recorded its phases");
    let phases: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    // Envoy 1.40's answers to the same calls (OK 0, NOT_FOUND 1, BAD_ARGUMENT 2).
    let expected: [(&str, Offer); 6] = [
        ("request_headers", (0, true, 0, 2, false, 2, 2, true)),
        ("call_response", (0, true, 0, 2, false, 2, 0, true)),
        (
            "call_response_after_resume",
            (2, false, 2, 2, false, 2, 0, false),
        ),
        ("response_headers", (2, false, 2, 0, true, 0, 2, false)),
        ("log", (0, true, 2, 0, true, 2, 1, true)),
        ("done", (2, false, 2, 2, false, 2, 2, false)),
    ];
    for (phase, want) in expected {
        assert_eq!(offer(&phases[phase]), want, "{phase}: {}", phases[phase]);
    }
}
