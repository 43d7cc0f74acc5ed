//! The real azgate filter in this host: start-up, configuration refusal and a local response
//! (call-outs are covered end to end by the scenario suite on `azgate serve`). Needs `make wasm` (the Makefile runs it before the tests).

#![allow(clippy::expect_used, reason = "test helpers fail the test on purpose")]

mod common;

use azgate_wasmhost::{
    Action, HostError, Plugin, PluginOptions, SharedStores, StreamAction, StreamInfo,
};

fn filter_wasm() -> Vec<u8> {
    common::built_wasm("AZGATE_WASM", "azgate_filter.wasm", "wasm")
}

fn options(config: &str) -> PluginOptions {
    PluginOptions {
        name: "azgate".into(),
        root_id: "azgate".into(),
        vm_id: "azgate".into(),
        plugin_config: config.as_bytes().to_vec(),
        vm_config: Vec::new(),
        clusters: vec!["azgate_msi".into()],
        log_level: 2,
        cache_dir: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn a_bad_configuration_is_refused_at_start() {
    let plugin = Plugin::load(
        &filter_wasm(),
        options(r#"{"roles": 5}"#),
        SharedStores::default(),
    )
    .expect("the filter compiles");
    assert_eq!(plugin.start_vm().err(), Some(HostError::ConfigureRejected));
}

#[test]
fn a_request_without_certificate_gets_the_filters_local_response() {
    let plugin = Plugin::load(
        &filter_wasm(),
        options(r#"{"roles": []}"#),
        SharedStores::default(),
    )
    .expect("the filter compiles");
    let mut vm = plugin.start_vm().expect("the VM starts");
    let id = vm
        .create_stream(
            headers(&[
                (":method", "GET"),
                (":path", "/x"),
                (":authority", "gw"),
                ("x-forwarded-host", "management.azure.com"),
            ]),
            StreamInfo::default(),
        )
        .expect("stream created");
    assert_eq!(
        vm.on_request_headers(id, true).expect("no trap"),
        Action::Pause
    );
    let effects = vm.take_effects();
    let [(stream, StreamAction::LocalResponse(response))] = effects.actions.as_slice() else {
        panic!("expected one local response, got {:?}", effects.actions);
    };
    assert_eq!(*stream, id);
    assert_eq!(response.status, 401);
    assert!(
        response
            .headers
            .iter()
            .any(|(k, v)| k == "x-azgate-error" && v == b"MissingClientCertificate")
    );
    vm.finish_stream(id).expect("finished without trap");
    assert!(vm.open_streams().is_empty());
}

/// The compiled modules in the cache at `dir` (not its usage counters, `*.stats`, nor the
/// cleanup marker its background worker writes).
fn cached_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.join("modules")];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).expect("readable cache directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_none_or(|e| e != "stats") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn code_compiled_into_the_cache_is_what_a_later_load_uses() {
    let dir = std::env::temp_dir().join(format!("azgate-wasmhost-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let wasm = filter_wasm();
    Plugin::compile_into_cache(&wasm, &dir).expect("the filter compiles");
    let compiled = cached_files(&dir);
    assert_eq!(compiled.len(), 1, "one compiled module: {compiled:?}");
    let inodes = |files: &[std::path::PathBuf]| {
        use std::os::unix::fs::MetadataExt as _;
        files
            .iter()
            .map(|f| std::fs::metadata(f).expect("a cached file").ino())
            .collect::<Vec<_>>()
    };
    let before = inodes(&compiled);
    let plugin = Plugin::load(
        &wasm,
        PluginOptions {
            cache_dir: Some(dir.clone()),
            ..options(r#"{"roles": []}"#)
        },
        SharedStores::default(),
    )
    .expect("the cached code loads");
    plugin.start_vm().expect("the VM starts from cached code");
    // A miss would have compiled again and written another entry (another key: an engine
    // configured differently) or replaced this one (a new file: another inode).
    assert_eq!(cached_files(&dir), compiled);
    assert_eq!(inodes(&compiled), before);
    // Other bytes are another module: not found, compiled, cached beside the first.
    let other = common::built_wasm("AZGATE_PROBE_WASM", "azgate_probe.wasm", "probe");
    Plugin::compile_into_cache(&other, &dir).expect("the probe compiles");
    assert_eq!(cached_files(&dir).len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
