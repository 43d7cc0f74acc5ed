use std::path::PathBuf;

use super::*;

/// A directory with `azgate.yaml` (from `yaml`) and the files it names.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str, yaml: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("azgate-envoy-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in [
            (
                "ca.crt",
                "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n",
            ),
            (
                "system.crt",
                "-----BEGIN CERTIFICATE-----\nU1lT\n-----END CERTIFICATE-----\n",
            ),
            ("gateway.crt", "cert"),
            ("gateway.key", "key"),
            ("azgate.wasm", "wasm"),
            (
                "roles.yaml",
                "kind: role\nversion: v7\nmetadata: {name: reader}\nspec:\n  allow:\n    azure_identities: [\"/subscriptions/0/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader\"]\n",
            ),
            ("azgate.yaml", yaml),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
        }
        Self { dir }
    }

    fn render(&self) -> Result<Value, ConfigError> {
        let config = ServeConfig::load(&self.dir.join("azgate.yaml"))?;
        envoy_document(&config, &self.options())
    }

    fn options(&self) -> RenderOptions {
        RenderOptions {
            token_service_address: "127.0.0.1:50342".parse().unwrap(),
            system_ca_file: Some(self.dir.join("system.crt")),
            source: self.dir.join("azgate.yaml"),
            filter_resource: None,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const GATEWAY: &str = r#"
listeners:
  - name: azgate
    address: 0.0.0.0:8443
    max_connections: 500
    tls: {cert: gateway.crt, key: gateway.key, client_ca: [ca.crt]}
admin: {address: 127.0.0.1:9901}
filter:
  path: azgate.wasm
  config: {clouds: [public]}
  role_files: [roles.yaml]
clusters:
  azgate_msi: {token_service: true}
"#;

fn hcm(document: &Value, listener: usize) -> &Value {
    let filters =
        &document["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"];
    filters
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .map(|f| &f["typed_config"])
        .unwrap()
}

fn cluster<'a>(document: &'a Value, name: &str) -> &'a Value {
    document["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

#[test]
fn tls_listener_verifies_clients_and_sets_xfcc_from_the_verified_certificate() {
    let fixture = Fixture::new("tls", GATEWAY);
    let document = fixture.render().unwrap();
    let listener = &document["static_resources"]["listeners"][0];
    let tls = &listener["filter_chains"][0]["transport_socket"]["typed_config"];
    assert_eq!(tls["require_client_certificate"], true);
    assert_eq!(
        tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"],
        fixture.dir.join("ca.crt").to_str().unwrap()
    );
    assert!(
        tls["common_tls_context"]["validation_context"]
            .get("allow_expired_certificate")
            .is_none()
    );
    let hcm = hcm(&document, 0);
    assert_eq!(hcm["forward_client_cert_details"], "SANITIZE_SET");
    // Only the certificate: Subject, URI and DNS are text its holder chose.
    assert_eq!(
        hcm["set_current_client_cert_details"],
        json!({"cert": true})
    );
}

#[test]
fn wasm_filter_reloads_a_trapped_vm_with_role_files_merged_into_its_configuration() {
    let fixture = Fixture::new("wasm", GATEWAY);
    let document = fixture.render().unwrap();
    let filters = hcm(&document, 0)["http_filters"].as_array().unwrap();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    // The forward proxy must see the `:authority` the filter set, so it comes after it; the
    // buffer holds the body between the filter's decision and the router.
    assert_eq!(
        names,
        [
            "envoy.filters.http.wasm",
            "envoy.filters.http.buffer",
            "envoy.filters.http.dynamic_forward_proxy",
            "envoy.filters.http.router"
        ]
    );
    let wasm = &filters[0]["typed_config"]["config"];
    assert_eq!(wasm["failure_policy"], "FAIL_RELOAD");
    assert_eq!(wasm["reload_config"]["backoff"]["base_interval"], "0.2s");
    assert_eq!(wasm["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
    let plugin: Value =
        serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(plugin["clouds"], json!(["public"]));
    assert_eq!(plugin["roles"][0]["metadata"]["name"], "reader");
}

#[test]
fn token_service_clusters_point_at_the_token_service() {
    let fixture = Fixture::new("token", GATEWAY);
    let document = fixture.render().unwrap();
    let msi = cluster(&document, "azgate_msi");
    let address = &msi["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
    assert_eq!(address["socket_address"]["address"], "127.0.0.1");
    assert_eq!(address["socket_address"]["port_value"], 50342);
    assert!(
        msi.get("transport_socket").is_none(),
        "plain HTTP on loopback"
    );
}

#[test]
fn azure_goes_through_the_dynamic_forward_proxy_with_system_roots() {
    let fixture = Fixture::new("dfp", GATEWAY);
    let document = fixture.render().unwrap();
    let azure = cluster(&document, "azure");
    assert_eq!(
        azure["cluster_type"]["name"],
        "envoy.clusters.dynamic_forward_proxy"
    );
    let tls = &azure["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(
        tls["validation_context"]["trusted_ca"]["filename"],
        fixture.dir.join("system.crt").to_str().unwrap()
    );
    let protocol = &azure["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert_eq!(protocol["upstream_http_protocol_options"]["auto_sni"], true);
    assert_eq!(
        protocol["upstream_http_protocol_options"]["auto_san_validation"],
        true
    );
    let routes = hcm(&document, 0)["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0]["route"]["cluster"], "azure");
    assert_eq!(routes[0]["route"]["timeout"], "60s");
}

#[test]
fn resolve_overrides_become_authority_routes_ahead_of_the_forward_proxy() {
    let yaml = format!(
        "{GATEWAY}upstream:\n  extra_ca: [ca.crt]\n  request_timeout_ms: 1500\n  resolve:\n    management.azure.com: 127.0.0.1:9443\n"
    );
    let fixture = Fixture::new("resolve", &yaml);
    let document = fixture.render().unwrap();
    let routes = hcm(&document, 0)["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes[0]["match"]["headers"][0],
        json!({"name": ":authority", "string_match": {"exact": "management.azure.com"}})
    );
    assert_eq!(routes[0]["route"]["timeout"], "1.5s");
    assert_eq!(routes[1]["route"]["cluster"], "azure");
    let fixed = cluster(&document, routes[0]["route"]["cluster"].as_str().unwrap());
    assert_eq!(
        fixed["transport_socket"]["typed_config"]["sni"],
        "management.azure.com"
    );
    // The extra CA is trusted besides the system roots: both inline.
    let ca = fixed["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
        ["trusted_ca"]["inline_string"]
        .as_str()
        .unwrap();
    assert!(ca.contains("U1lT") && ca.contains("Q0E="), "{ca}");
}

#[test]
fn plaintext_behind_a_front_trusts_the_fronts_xfcc() {
    let yaml = GATEWAY.replace(
        "    tls: {cert: gateway.crt, key: gateway.key, client_ca: [ca.crt]}\n",
        "    plaintext_behind_trusted_front: true\n",
    );
    let fixture = Fixture::new("plaintext", &yaml);
    let document = fixture.render().unwrap();
    let chain = &document["static_resources"]["listeners"][0]["filter_chains"][0];
    assert!(chain.get("transport_socket").is_none());
    assert_eq!(
        hcm(&document, 0)["forward_client_cert_details"],
        "ALWAYS_FORWARD_ONLY"
    );
}

#[test]
fn connection_limits_per_listener_and_overall() {
    let fixture = Fixture::new("limits", GATEWAY);
    let document = fixture.render().unwrap();
    let filters = &document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"];
    assert_eq!(filters[0]["name"], "envoy.filters.network.connection_limit");
    assert_eq!(filters[0]["typed_config"]["max_connections"], 500);
    assert_eq!(
        document["overload_manager"]["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"],
        500
    );
}

#[test]
fn access_log_is_json_without_query_strings_or_credentials() {
    let fixture = Fixture::new("log", GATEWAY);
    let document = fixture.render().unwrap();
    let log = &hcm(&document, 0)["access_log"][0]["typed_config"]["log_format"];
    let format = log["json_format"].as_object().unwrap();
    assert_eq!(format["path"], "%REQ_WITHOUT_QUERY(:PATH)%");
    let text = serde_json::to_string(format).unwrap().to_ascii_lowercase();
    for leak in ["authorization", "x-forwarded-client-cert", "%req(:path)%"] {
        assert!(!text.contains(leak), "{leak} in {text}");
    }
}

#[test]
fn admin_must_stay_on_loopback() {
    let yaml = GATEWAY.replace(
        "admin: {address: 127.0.0.1:9901}",
        "admin: {address: 0.0.0.0:9901}",
    );
    let fixture = Fixture::new("admin", &yaml);
    let error = fixture.render().unwrap_err();
    assert_eq!(error.field, "admin.address");
}

#[test]
fn without_admin_there_is_no_admin_interface() {
    let yaml = GATEWAY.replace("admin: {address: 127.0.0.1:9901}\n", "");
    let fixture = Fixture::new("noadmin", &yaml);
    assert!(fixture.render().unwrap().get("admin").is_none());
}

#[test]
fn rendered_text_names_its_source_and_what_envoy_does_not_enforce() {
    let yaml = format!("{GATEWAY}workers: 4\nupstream:\n  max_request_body_bytes: 1000\n");
    let fixture = Fixture::new("header", &yaml);
    let config = ServeConfig::load(&fixture.dir.join("azgate.yaml")).unwrap();
    let text = render(&config, &fixture.options()).unwrap();
    assert!(text.starts_with("# Envoy configuration rendered by `azgate envoy-config`"));
    assert!(text.contains("--concurrency 4"));
    assert!(text.contains("azgate token-service --listen 127.0.0.1:50342"));
    // The YAML part parses back to the same document.
    let parsed: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(parsed, envoy_document(&config, &fixture.options()).unwrap());
}

#[test]
fn the_shipped_example_configuration_loads_and_renders() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/azgate.yaml");
    let config = ServeConfig::load(&example).unwrap();
    let options = RenderOptions {
        token_service_address: DEFAULT_TOKEN_SERVICE_ADDRESS.parse().unwrap(),
        system_ca_file: Some("/etc/ssl/certs/ca-certificates.crt".into()),
        source: example.clone(),
        filter_resource: None,
    };
    let document = envoy_document(&config, &options).unwrap();
    assert_eq!(
        document["admin"]["address"]["socket_address"]["address"],
        "127.0.0.1"
    );
    let plugin =
        &hcm(&document, 0)["http_filters"][0]["typed_config"]["config"]["configuration"]["value"];
    let plugin: Value = serde_json::from_str(plugin.as_str().unwrap()).unwrap();
    assert_eq!(plugin["roles"][0]["metadata"]["name"], "azure-reader");
}

#[test]
fn the_token_service_hint_carries_the_configured_token_source() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let render_header = |file: &str| {
        let path = deploy.join(file);
        let config = ServeConfig::load(&path).unwrap();
        let options = RenderOptions {
            token_service_address: "unix:/run/azgate-msi/token.sock".parse().unwrap(),
            system_ca_file: Some("/etc/ssl/certs/ca-certificates.crt".into()),
            source: path,
            filter_resource: None,
        };
        let text = render(&config, &options).unwrap();
        text.lines()
            .find(|line| line.starts_with("# token_service clusters -> run "))
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        render_header("azgate.yaml"),
        "# token_service clusters -> run `azgate token-service --listen \
         unix:/run/azgate-msi/token.sock --source imds --imds-endpoint http://169.254.169.254`"
    );
    let aks = render_header("azgate-aks-workload-identity.yaml");
    assert!(
        aks.contains(
            "--listen unix:/run/azgate-msi/token.sock --source workload-identity \
             --allow-identity system --allow-identity msi_res_id=/subscriptions/"
        ),
        "{aks}"
    );
    assert!(
        aks.contains("/userAssignedIdentities/azure-reader=11111111-1111-1111-1111-111111111111 --deadline-ms 5000 --max-requests-per-second 20`"),
        "{aks}"
    );
}

#[test]
fn a_unix_socket_token_service_is_an_envoy_pipe() {
    let fixture = Fixture::new("pipe", GATEWAY);
    let config = ServeConfig::load(&fixture.dir.join("azgate.yaml")).unwrap();
    let options = RenderOptions {
        token_service_address: "unix:/run/azgate/token.sock".parse().unwrap(),
        ..fixture.options()
    };
    let document = envoy_document(&config, &options).unwrap();
    let msi = cluster(&document, "azgate_msi");
    assert_eq!(
        msi["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
        json!({"pipe": {"path": "/run/azgate/token.sock"}})
    );
}

#[test]
fn listen_addresses_are_tcp_or_absolute_unix_paths() {
    assert_eq!(
        "127.0.0.1:50342".parse::<ListenAddress>().unwrap(),
        ListenAddress::Tcp("127.0.0.1:50342".parse().unwrap())
    );
    assert_eq!(
        "unix:/run/azgate/token.sock"
            .parse::<ListenAddress>()
            .unwrap()
            .to_string(),
        "unix:/run/azgate/token.sock"
    );
    assert!("unix:token.sock".parse::<ListenAddress>().is_err());
    assert!("localhost".parse::<ListenAddress>().is_err());
}

#[test]
fn request_bodies_are_buffered_up_to_the_configured_limit() {
    let fixture = Fixture::new("buffer-default", GATEWAY);
    let buffer = |document: &Value| {
        hcm(document, 0)["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.buffer")
            .map(|f| f["typed_config"]["max_request_bytes"].clone())
            .unwrap()
    };
    assert_eq!(buffer(&fixture.render().unwrap()), 32 << 20);
    let yaml = format!("{GATEWAY}upstream:\n  max_request_body_bytes: 1000\n");
    let fixture = Fixture::new("buffer-set", &yaml);
    assert_eq!(buffer(&fixture.render().unwrap()), 1000);
    // Envoy's limit is 32-bit.
    let yaml = format!("{GATEWAY}upstream:\n  max_request_body_bytes: 4294967296\n");
    let fixture = Fixture::new("buffer-huge", &yaml);
    assert_eq!(
        fixture.render().unwrap_err().field,
        "upstream.max_request_body_bytes"
    );
}

#[test]
fn request_headers_and_timeouts_are_bounded_as_in_serve() {
    let fixture = Fixture::new("bounds", GATEWAY);
    let document = fixture.render().unwrap();
    let manager = hcm(&document, 0);
    assert_eq!(manager["max_request_headers_kb"], 60);
    assert_eq!(
        manager["common_http_protocol_options"]["max_headers_count"],
        100
    );
    assert_eq!(
        manager["http_protocol_options"]["allow_absolute_url"],
        false
    );
    assert_eq!(manager["request_headers_timeout"], "10s");
    assert_eq!(manager["request_timeout"], "60s");
    let yaml = GATEWAY.replace(
        "    max_connections: 500\n",
        "    max_connections: 500\n    request_headers_timeout_ms: 2500\n    request_timeout_ms: 30000\n",
    );
    let fixture = Fixture::new("bounds-set", &yaml);
    let document = fixture.render().unwrap();
    assert_eq!(hcm(&document, 0)["request_headers_timeout"], "2.5s");
    assert_eq!(hcm(&document, 0)["request_timeout"], "30s");
}

#[test]
fn envoys_own_refusals_get_azgates_error_shape_and_the_filters_answers_are_left_alone() {
    let fixture = Fixture::new("replies", GATEWAY);
    let document = fixture.render().unwrap();
    let mappers = hcm(&document, 0)["local_reply_config"]["mappers"]
        .as_array()
        .unwrap()
        .clone();
    let code_of = |mapper: &Value| {
        (
            mapper["status_code"].as_u64().unwrap(),
            mapper["body_format_override"]["json_format"]["error"]["code"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    let by_status: Vec<(u64, (u64, String))> = mappers
        .iter()
        .filter_map(|m| {
            let status = m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]
                .as_u64()?;
            Some((status, code_of(m)))
        })
        .collect();
    assert_eq!(
        by_status,
        [
            (408, (408, "RequestTimeout".to_owned())),
            (413, (413, "RequestTooLarge".to_owned())),
            (431, (431, "RequestHeaderFieldsTooLarge".to_owned())),
            (404, (400, "InvalidRequestTarget".to_owned())),
            (501, (400, "BadRequest".to_owned())),
        ]
    );
    // Statuses matched alone must be ones the filter never answers with.
    for (status, _) in &by_status {
        assert!(
            ![400, 401, 403, 405, 500, 502, 503, 504].contains(status),
            "{status}"
        );
    }
    let by_flags: Vec<(Vec<String>, (u64, String))> = mappers
        .iter()
        .filter_map(|m| {
            let flags = m["filter"]["response_flag_filter"]["flags"].as_array()?;
            let flags = flags
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            Some((flags, code_of(m)))
        })
        .collect();
    assert_eq!(by_flags.len(), 2, "{by_flags:?}");
    assert_eq!(by_flags[0].1, (503, "UpstreamUnavailable".to_owned()));
    assert_eq!(
        by_flags[1],
        (vec!["UT".to_owned()], (504, "UpstreamTimeout".to_owned()))
    );
    for mapper in &mappers {
        let code = &mapper["body_format_override"]["json_format"]["error"]["code"];
        assert_eq!(mapper["headers_to_add"][0]["header"]["value"], *code);
    }
}

#[test]
fn with_policy_files_the_filter_configuration_is_an_ecds_resource_envoy_watches() {
    let fixture = Fixture::new("ecds", GATEWAY);
    let config = ServeConfig::load(&fixture.dir.join("azgate.yaml")).unwrap();
    let resource = fixture.dir.join("envoy.filter.yaml");
    let options = RenderOptions {
        filter_resource: Some(resource.clone()),
        ..fixture.options()
    };
    let document = envoy_document(&config, &options).unwrap();
    assert_eq!(document["node"]["id"], "azgate");
    let filters = hcm(&document, 0)["http_filters"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(filters[0]["name"], "envoy.filters.http.wasm");
    assert!(filters[0].get("typed_config").is_none());
    let source = &filters[0]["config_discovery"]["config_source"]["path_config_source"];
    assert_eq!(source["path"], resource.display().to_string());
    assert_eq!(
        source["watched_directory"]["path"],
        fixture.dir.display().to_string()
    );
    // The resource holds what the inline configuration would have held.
    let text = render_filter_resource(&config, &config.plugin_config().unwrap()).unwrap();
    let parsed: Value = serde_yaml::from_str(&text).unwrap();
    let inline = envoy_document(&config, &fixture.options()).unwrap();
    assert_eq!(
        parsed["resources"][0]["typed_config"],
        hcm(&inline, 0)["http_filters"][0]["typed_config"]
    );
    assert_eq!(parsed["resources"][0]["name"], "envoy.filters.http.wasm");
}
