//! Host ABI tests with a purpose-built probe guest (WAT). The probe does one thing per request,
//! chosen by the first letter of its `x-probe` header, and records what the host answered in
//! shared data, where the test reads it.

#![allow(clippy::expect_used, reason = "test helpers fail the test on purpose")]

use azgate_wasmhost::{
    Action, CallResponse, HostError, Plugin, PluginOptions, SharedStores, StreamAction, StreamInfo,
    Vm, serialize_pairs,
};

/// Lays out strings at fixed addresses and emits the data segments.
struct Data {
    next: u32,
    segments: String,
}

impl Data {
    fn new() -> Self {
        Self {
            next: 4096,
            segments: String::new(),
        }
    }

    /// `(ptr len)` of `bytes` in guest memory, as WAT operands.
    fn add(&mut self, bytes: &[u8]) -> String {
        let ptr = self.next;
        let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
        self.segments
            .push_str(&format!("(data (i32.const {ptr}) \"{escaped}\")\n"));
        self.next += bytes.len() as u32 + 8;
        format!("(i32.const {ptr}) (i32.const {})", bytes.len())
    }
}

fn probe_module() -> Vec<u8> {
    let mut d = Data::new();
    let s = |d: &mut Data, text: &str| d.add(text.as_bytes());
    let call_headers = serialize_pairs(&[
        (":method", "GET"),
        (":path", "/token"),
        (":authority", "imds"),
    ]);
    let no_authority = serialize_pairs(&[(":method", "GET"), (":path", "/token")]);
    let wat = format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incr (param i32 i64) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_a_future_call" (func $unknown (result i32)))
  (memory (export "memory") 4)
  (global $heap (mut i32) (i32.const 131072))
  (global $paused (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func $record (param i32 i32 i32 i32)
    (drop (call $set_shared (local.get 0) (local.get 1) (local.get 2) (local.get 3) (i32.const 0))))
  (func $record_status (param $kp i32) (param $kl i32) (param $status i32)
    (i32.store (i32.const 1024) (local.get $status))
    (call $record (local.get $kp) (local.get $kl) (i32.const 1024) (i32.const 4)))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $get_buffer (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 2048) (i32.const 2052)))
    (call $record {config} (i32.load (i32.const 2048)) (i32.load (i32.const 2052)))
    (drop (call $tick (i32.const 25)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
    (local $op i32)
    (if (call $get_header (i32.const 0) {x_probe} (i32.const 2048) (i32.const 2052))
      (then (return (i32.const 0))))
    (local.set $op (i32.load8_u (i32.load (i32.const 2048))))
    ;; h: header map edits
    (if (i32.eq (local.get $op) (i32.const 104)) (then
      (drop (call $replace_header (i32.const 0) {x_test_upper} {value_a}))
      (drop (call $add_header (i32.const 0) {x_multi} {value_1}))
      (drop (call $add_header (i32.const 0) {x_multi} {value_2}))
      (drop (call $remove_header (i32.const 0) {x_gone}))
      (call $record_status {get_missing} (call $get_header (i32.const 0) {x_missing} (i32.const 2048) (i32.const 2052)))
      (call $record_status {get_bad_map} (call $get_header (i32.const 6) {x_probe} (i32.const 2048) (i32.const 2052)))
      (return (i32.const 0))))
    ;; l: local response
    (if (i32.eq (local.get $op) (i32.const 108)) (then
      (call $record_status {local_status}
        (call $local (i32.const 403) (i32.const 0) (i32.const 0) {body_denied} (i32.const 0) (i32.const 0) (i32.const -1)))
      (return (i32.const 1))))
    ;; c: call-outs (unknown cluster, missing :authority, then a good one) and pause
    (if (i32.eq (local.get $op) (i32.const 99)) (then
      (call $record_status {call_unknown}
        (call $http_call {unknown_cluster} {call_headers} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 1028)))
      (call $record_status {call_incomplete}
        (call $http_call {cluster} {no_authority} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 1028)))
      (call $record_status {call_ok}
        (call $http_call {cluster} {call_headers} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 1028)))
      (global.set $paused (local.get $id))
      (return (i32.const 1))))
    ;; p: properties and metrics
    (if (i32.eq (local.get $op) (i32.const 112)) (then
      (drop (call $prop {plugin_name} (i32.const 2048) (i32.const 2052)))
      (call $record {plugin_name_key} (i32.load (i32.const 2048)) (i32.load (i32.const 2052)))
      (drop (call $prop {request_path} (i32.const 2048) (i32.const 2052)))
      (call $record {request_path_key} (i32.load (i32.const 2048)) (i32.load (i32.const 2052)))
      (call $record_status {missing_property} (call $prop {no_such} (i32.const 2048) (i32.const 2052)))
      (drop (call $define (i32.const 0) {metric_name} (i32.const 1032)))
      (drop (call $incr (i32.load (i32.const 1032)) (i64.const 3)))
      (return (i32.const 0))))
    ;; b: the plugin configuration is only readable during proxy_on_configure
    (if (i32.eq (local.get $op) (i32.const 98)) (then
      (call $record_status {config_outside}
        (call $get_buffer (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 2048) (i32.const 2052)))
      (return (i32.const 0))))
    ;; o: a pointer outside memory
    (if (i32.eq (local.get $op) (i32.const 111)) (then
      (drop (call $log (i32.const 2) (i32.const -256) (i32.const 1000)))))
    ;; u: an import the host does not provide
    (if (i32.eq (local.get $op) (i32.const 117)) (then
      (drop (call $unknown))))
    ;; t: a trap (what a Rust panic becomes)
    (if (i32.eq (local.get $op) (i32.const 116)) (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32) (param $body i32) (param $nt i32)
    (call $record_status {response_headers} (local.get $nh))
    (if (i32.gt_u (local.get $nh) (i32.const 0)) (then
      (drop (call $get_buffer (i32.const 4) (i32.const 0) (local.get $body) (i32.const 2048) (i32.const 2052)))
      (call $record {response_body} (i32.load (i32.const 2048)) (i32.load (i32.const 2052)))))
    (drop (call $effective (global.get $paused)))
    (drop (call $continue (i32.const 0))))
  {data})"#,
        config = s(&mut d, "config"),
        x_probe = s(&mut d, "x-probe"),
        x_test_upper = s(&mut d, "X-Test"),
        value_a = s(&mut d, "a"),
        x_multi = s(&mut d, "x-multi"),
        value_1 = s(&mut d, "1"),
        value_2 = s(&mut d, "2"),
        x_gone = s(&mut d, "x-gone"),
        get_missing = s(&mut d, "get_missing"),
        x_missing = s(&mut d, "x-missing"),
        get_bad_map = s(&mut d, "get_bad_map"),
        local_status = s(&mut d, "local_status"),
        body_denied = s(&mut d, "denied"),
        call_unknown = s(&mut d, "call_unknown"),
        unknown_cluster = s(&mut d, "nowhere"),
        call_headers = d.add(&call_headers),
        call_incomplete = s(&mut d, "call_incomplete"),
        cluster = s(&mut d, "imds"),
        no_authority = d.add(&no_authority),
        call_ok = s(&mut d, "call_ok"),
        plugin_name = s(&mut d, "plugin_name"),
        plugin_name_key = s(&mut d, "plugin_name_value"),
        request_path = d.add(b"request\0path"),
        request_path_key = s(&mut d, "request_path_value"),
        missing_property = s(&mut d, "missing_property"),
        no_such = d.add(b"no\0such"),
        metric_name = s(&mut d, "probe_requests"),
        config_outside = s(&mut d, "config_outside"),
        response_headers = s(&mut d, "response_headers"),
        response_body = s(&mut d, "response_body"),
        data = d.segments,
    );
    wat::parse_str(&wat).expect("the probe is valid WAT")
}

fn start(stores: &SharedStores) -> (Plugin, Vm) {
    let options = PluginOptions {
        name: "probe".into(),
        root_id: "probe".into(),
        vm_id: "probe".into(),
        plugin_config: b"{\"hello\":1}".to_vec(),
        vm_config: Vec::new(),
        clusters: vec!["imds".into()],
        log_level: 2,
        cache_dir: None,
    };
    let plugin = Plugin::load(&probe_module(), options, stores.clone()).expect("probe loads");
    let vm = plugin.start_vm().expect("probe starts");
    (plugin, vm)
}

fn request(vm: &mut Vm, probe: &str, extra: &[(&str, &str)]) -> (u32, Result<Action, HostError>) {
    let mut headers = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/p?q=1".to_vec()),
        ("x-probe".to_string(), probe.as_bytes().to_vec()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
    );
    let id = vm
        .create_stream(headers, StreamInfo::default())
        .expect("stream");
    (id, vm.on_request_headers(id, true))
}

fn recorded(stores: &SharedStores, key: &str) -> Vec<u8> {
    stores.data.get(key).map(|(v, _)| v).unwrap_or_default()
}

fn recorded_status(stores: &SharedStores, key: &str) -> i32 {
    let bytes = recorded(stores, key);
    i32::from_le_bytes(bytes.try_into().expect("a recorded status is 4 bytes"))
}

#[test]
fn configuration_is_readable_during_configure_only_and_ticks_are_requested() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    assert_eq!(recorded(&stores, "config"), b"{\"hello\":1}");
    assert_eq!(
        vm.take_effects().tick_period,
        Some(std::time::Duration::from_millis(25))
    );
    let (_, action) = request(&mut vm, "b", &[]);
    assert_eq!(action, Ok(Action::Continue));
    assert_eq!(recorded_status(&stores, "config_outside"), 1, "NOT_FOUND");
}

#[test]
fn header_maps_follow_envoy() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    let (id, action) = request(
        &mut vm,
        "h",
        &[("x-gone", "x"), ("x-gone", "y"), ("x-test", "old")],
    );
    assert_eq!(action, Ok(Action::Continue));
    let headers = &vm.stream(id).expect("stream").request_headers;
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    assert_eq!(
        values("x-test"),
        vec![b"a".as_slice()],
        "replace lower-cases the key and keeps one value"
    );
    assert_eq!(
        values("x-multi"),
        vec![b"1".as_slice(), b"2".as_slice()],
        "add appends"
    );
    assert!(values("x-gone").is_empty(), "remove drops every value");
    assert_eq!(recorded_status(&stores, "get_missing"), 1, "NOT_FOUND");
    assert_eq!(
        recorded_status(&stores, "get_bad_map"),
        2,
        "no call response: BAD_ARGUMENT"
    );
}

#[test]
fn local_response_is_an_effect_for_the_stream() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    vm.take_effects();
    let (id, action) = request(&mut vm, "l", &[]);
    assert_eq!(action, Ok(Action::Pause));
    assert_eq!(recorded_status(&stores, "local_status"), 0);
    let effects = vm.take_effects();
    match effects.actions.as_slice() {
        [(stream, StreamAction::LocalResponse(local))] => {
            assert_eq!(*stream, id);
            assert_eq!(local.status, 403);
            assert_eq!(local.body, b"denied");
        }
        other => panic!("unexpected actions {other:?}"),
    }
}

#[test]
fn http_calls_are_validated_dispatched_and_answered_on_the_root_context() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    vm.take_effects();
    let (id, action) = request(&mut vm, "c", &[]);
    assert_eq!(action, Ok(Action::Pause));
    assert_eq!(
        recorded_status(&stores, "call_unknown"),
        2,
        "unknown cluster: BAD_ARGUMENT"
    );
    assert_eq!(
        recorded_status(&stores, "call_incomplete"),
        2,
        "no :authority: BAD_ARGUMENT"
    );
    assert_eq!(recorded_status(&stores, "call_ok"), 0);
    let effects = vm.take_effects();
    let [call] = effects.calls.as_slice() else {
        panic!("expected one call, got {:?}", effects.calls);
    };
    assert_eq!(call.cluster, "imds");
    assert_eq!(call.timeout, Some(std::time::Duration::from_millis(500)));
    let response = CallResponse {
        headers: vec![(":status".into(), b"200".to_vec())],
        body: b"token!".to_vec(),
        trailers: Vec::new(),
    };
    vm.on_http_call_response(call.token, response)
        .expect("no trap");
    assert_eq!(recorded_status(&stores, "response_headers"), 1);
    assert_eq!(recorded(&stores, "response_body"), b"token!");
    let effects = vm.take_effects();
    assert_eq!(
        effects.actions,
        vec![(id, StreamAction::Continue(0))],
        "resume after the answer"
    );
    // A reset is reported with no headers, as Envoy does.
    vm.on_http_call_response(call.token, CallResponse::failed())
        .expect("no trap");
    assert_eq!(recorded_status(&stores, "response_headers"), 0);
}

#[test]
fn properties_and_metrics() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    request(&mut vm, "p", &[]).1.expect("no trap");
    request(&mut vm, "p", &[]).1.expect("no trap");
    assert_eq!(recorded(&stores, "plugin_name_value"), b"probe");
    assert_eq!(recorded(&stores, "request_path_value"), b"/p?q=1");
    assert_eq!(recorded_status(&stores, "missing_property"), 1, "NOT_FOUND");
    let sample = stores
        .metrics
        .samples()
        .into_iter()
        .find(|s| s.name == "probe_requests")
        .expect("metric defined");
    assert_eq!(
        sample.value, 6,
        "two requests incremented by 3, one metric across calls"
    );
}

#[test]
fn out_of_bounds_pointers_trap_and_fail_the_vm() {
    let stores = SharedStores::default();
    let (plugin, mut vm) = start(&stores);
    let (_, result) = request(&mut vm, "o", &[]);
    match result {
        Err(HostError::Trap(message)) => assert!(message.contains("out of bounds"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(vm.is_failed());
    assert!(
        matches!(vm.on_tick(), Err(HostError::Failed(_))),
        "a failed VM runs nothing more"
    );
    let mut replacement = plugin.start_vm().expect("a new VM starts");
    assert_eq!(request(&mut replacement, "b", &[]).1, Ok(Action::Continue));
}

#[test]
fn guest_traps_and_unknown_imports_fail_the_vm_without_panicking_the_host() {
    let stores = SharedStores::default();
    let (_plugin, mut vm) = start(&stores);
    assert!(matches!(
        request(&mut vm, "t", &[]).1,
        Err(HostError::Trap(_))
    ));
    let (_plugin, mut vm) = start(&stores);
    assert!(matches!(
        request(&mut vm, "u", &[]).1,
        Err(HostError::Trap(_))
    ));
}
