//! `azgate.yaml` (what `azgate serve` runs) on arbitrary bytes, through its only public entry
//! point, `ServeConfig::load(path)` (so the input is written to a file first), then the role
//! file reader on the same bytes, then — for a configuration that names no files to read —
//! the plugin configuration it hands the filter and the Envoy configuration `azgate
//! envoy-config` renders from it. Checks: no panic; the rendered YAML reads back as the
//! document it was rendered from (nothing in the file can inject YAML into Envoy's config).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use azgate::envoy_config::{self, RenderOptions};
use azgate::config::ServeConfig;
use azgate::config::teleport::read_role_file;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("azgate-fuzz-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory under the temp dir");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("azgate.yaml");
    std::fs::write(&path, data).expect("the scratch file is writable");
    let _ = read_role_file(&path);
    let Ok(config) = ServeConfig::load(&path) else {
        return;
    };
    if !config.filter.role_files.is_empty() || !config.upstream.extra_ca.is_empty() {
        return;
    }
    let plugin = config
        .plugin_config()
        .expect("without role files the plugin configuration is filter.config as JSON");
    let _ = azgate_filter::config::Config::parse(&plugin);
    let options = RenderOptions {
        token_service_address: envoy_config::DEFAULT_TOKEN_SERVICE_ADDRESS
            .parse()
            .expect("the default token service address parses"),
        system_ca_file: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
        source: path.clone(),
        filter_resource: None,
    };
    let (Ok(document), Ok(rendered)) = (
        envoy_config::envoy_document(&config, &options),
        envoy_config::render(&config, &options),
    ) else {
        return;
    };
    let back: serde_json::Value =
        serde_yaml::from_str(&rendered).expect("the rendered Envoy config is YAML");
    assert_eq!(
        back, document,
        "the rendered YAML does not read back as its document"
    );
});
