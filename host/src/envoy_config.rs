//! `azgate envoy-config`: the production Envoy configuration, rendered from the same
//! `azgate.yaml` that `azgate serve` reads, so one file says what either runtime does.
//!
//! What each part of `azgate.yaml` becomes:
//!
//! | `azgate.yaml` | Envoy |
//! |---|---|
//! | `listeners[]` with `tls` | a listener with a `DownstreamTlsContext` (client CA, certificate required unless `optional`), XFCC `SANITIZE_SET` with only the certificate (Envoy adds its `Hash`) |
//! | `listeners[]` with `plaintext_behind_trusted_front` | a plain listener, XFCC `ALWAYS_FORWARD_ONLY` (the front's header is trusted, as in `azgate serve`) |
//! | `listeners[].max_connections` | the `connection_limit` network filter; their sum is the overload manager's global limit |
//! | `listeners[].request_headers_timeout_ms`, `request_timeout_ms` | HCM `request_headers_timeout`, `request_timeout` (408) |
//! | `filter` (path, names, `config` + `role_files`) | the wasm HTTP filter on V8, `FAIL_RELOAD` (a trapped VM is replaced, backoff base 0.2 s), configuration inline |
//! | `clusters.X.address` | a static plain-HTTP cluster `X` |
//! | `clusters.X.token_service: true` | a static cluster `X` to `azgate token-service` (`--token-service-address`) |
//! | `upstream.resolve` | a route by `:authority` to a static TLS cluster per host (like `curl --resolve`) |
//! | everything else towards Azure | the dynamic forward proxy: DNS, TLS with SNI and SAN check from `:authority` |
//! | `upstream.extra_ca` | appended to the system CA bundle for upstream TLS |
//! | `upstream.connect_timeout_ms`, `request_timeout_ms` | cluster `connect_timeout`, route `timeout` |
//! | `upstream.max_request_body_bytes` | the buffer filter after the wasm filter: the whole body is received before anything goes upstream (413 beyond), as `azgate serve` does |
//! | `admin` | Envoy's admin interface; refused unless on loopback |
//! | (always) | request header blocks of at most 60 KiB and 100 fields (HTTP/1.1 and HTTP/2), absolute-form request targets refused, Envoy's own 4xx answers (codec errors, timeouts, too large) rewritten to azgate's JSON shape |
//!
//! `workers` becomes a note to start Envoy with `--concurrency`; `filter.cache_dir` has no Envoy
//! equivalent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::config::{
    ConfigError, ListenerConfig, MAX_REQUEST_HEADERS, MAX_REQUEST_HEADERS_BYTES, ServeConfig,
};
use crate::token::ListenAddress;

/// CA bundles tried, in order, when no `--system-ca-file` is given (Debian/Ubuntu/Alpine,
/// RHEL/Fedora, openSUSE).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// Where `azgate token-service` listens by default for Envoy's token clusters.
pub const DEFAULT_TOKEN_SERVICE_ADDRESS: &str = "127.0.0.1:50342";

/// Choices the `azgate.yaml` does not make.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// Where `azgate token-service` listens; used for `token_service: true` clusters.
    pub token_service_address: ListenAddress,
    /// The system CA bundle for upstream TLS; `None` picks the first of [`SYSTEM_CA_BUNDLES`].
    pub system_ca_file: Option<PathBuf>,
    /// Named in the header comment.
    pub source: PathBuf,
    /// Deliver the wasm filter's configuration through Envoy's extension config discovery
    /// (ECDS) from this file ([`render_filter_resource`]), which Envoy watches and applies live,
    /// instead of inline. `azgate envoy-config --output` uses it when there are policy files.
    pub filter_resource: Option<PathBuf>,
}

/// The wasm filter's name in the connection manager, and its ECDS resource name.
const WASM_FILTER_NAME: &str = "envoy.filters.http.wasm";
const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The least time between two reloads of a worker's trapped VM (`reload_config.backoff`); Envoy's
/// default is 1 s. A reload is one VM clone, so a trap storm costs at most a few clones a
/// second per worker, while a single trap costs no more than the request it happened in.
const WASM_RELOAD_BACKOFF: &str = "0.2s";

/// Renders the Envoy configuration as YAML, with a header comment.
pub fn render(config: &ServeConfig, options: &RenderOptions) -> Result<String, ConfigError> {
    let document = envoy_document(config, options)?;
    let yaml = serde_yaml::to_string(&document)
        .map_err(|e| ConfigError::new("(rendering)", e.to_string()))?;
    Ok(format!("{}{yaml}", header(config, options)))
}

/// The ECDS resource file for [`RenderOptions::filter_resource`]: a discovery response holding
/// the wasm filter's configuration (the plugin configuration with the role and lock files
/// merged). Re-rendering it after a policy change and moving it into place applies the change
/// in Envoy without a restart: new requests get a filter with the new configuration, requests
/// in flight finish with the old one.
/// `plugin_config` is [`ServeConfig::plugin_config`], read once by the caller (a policy
/// watcher has it already).
pub fn render_filter_resource(
    config: &ServeConfig,
    plugin_config: &[u8],
) -> Result<String, ConfigError> {
    let filter = wasm_filter(config, plugin_config)?;
    let document = json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": WASM_FILTER_NAME,
            "typed_config": filter["typed_config"],
        }],
    });
    let yaml = serde_yaml::to_string(&document)
        .map_err(|e| ConfigError::new("(rendering)", e.to_string()))?;
    Ok(format!(
        "# The azgate filter's configuration for Envoy's extension config discovery, rendered by\n\
         # `azgate envoy-config` from {}. Replace it by a rename.\n{yaml}",
        config.filter.path.display()
    ))
}

/// The configuration as a JSON value (what [`render`] writes as YAML).
pub fn envoy_document(config: &ServeConfig, options: &RenderOptions) -> Result<Value, ConfigError> {
    let upstream_ca = upstream_trusted_ca(config, options)?;
    // The defaults are `azgate serve`'s: one place says them (`crate::config`).
    let connect_timeout = seconds(config.upstream.connect_timeout());
    let request_timeout = seconds(config.upstream.request_timeout());

    let mut routes = Vec::new();
    let mut clusters = Vec::new();
    for (index, (host, address)) in config.upstream.resolve.iter().enumerate() {
        let name = format!("azure_resolve_{index}");
        routes.push(json!({
            "match": {
                "prefix": "/",
                "headers": [{"name": ":authority", "string_match": {"exact": host}}],
            },
            "route": {"cluster": name, "timeout": request_timeout},
        }));
        clusters.push(json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": connect_timeout,
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(*address)}}]}],
            },
            "typed_extension_protocol_options": azure_protocol_options(),
            "transport_socket": upstream_tls(&upstream_ca, Some(host)),
        }));
    }
    routes.push(json!({
        "match": {"prefix": "/"},
        "route": {"cluster": "azure", "timeout": request_timeout},
    }));
    clusters.push(json!({
        "name": "azure",
        "connect_timeout": connect_timeout,
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache(),
            },
        },
        "typed_extension_protocol_options": azure_protocol_options(),
        "transport_socket": upstream_tls(&upstream_ca, None),
    }));

    for (name, cluster) in &config.clusters {
        let address = match (cluster.token_service, cluster.address) {
            (_, Some(address)) => address_of(&ListenAddress::Tcp(address)),
            (true, None) => address_of(&options.token_service_address),
            (false, None) => {
                return Err(ConfigError::new(
                    format!("clusters.{name}"),
                    "needs token_service: true or an address",
                ));
            }
        };
        clusters.push(json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }));
    }

    let route_config = json!({
        "name": "azure",
        "virtual_hosts": [{"name": "azure", "domains": ["*"], "routes": routes}],
    });
    let wasm_filter = match &options.filter_resource {
        None => wasm_filter(config, &config.plugin_config()?)?,
        Some(path) => {
            let file = path_text(path, "--output")?;
            let directory = path
                .parent()
                .map(|d| path_text(d, "--output"))
                .transpose()?
                .unwrap_or_else(|| ".".into());
            json!({
                "name": WASM_FILTER_NAME,
                "config_discovery": {
                    // Envoy re-reads the file when one is moved into the directory, so the
                    // resource is replaced by a rename, never seen half-written.
                    "config_source": {
                        "path_config_source": {"path": file, "watched_directory": {"path": directory}},
                        "resource_api_version": "V3",
                    },
                    "type_urls": [WASM_TYPE_URL],
                },
            })
        }
    };
    let body_limit = u32::try_from(config.upstream.max_request_body_bytes())
        .map_err(|_| ConfigError::new("upstream.max_request_body_bytes", "at most 4294967295"))?;
    let mut listeners = Vec::new();
    let mut total_connections: u64 = 0;
    for (index, listener) in config.listeners.iter().enumerate() {
        total_connections += u64::from(listener.max_connections);
        listeners.push(envoy_listener(
            index,
            listener,
            &route_config,
            &wasm_filter,
            body_limit,
        )?);
    }

    let mut document = json!({
        // Envoy requires a node identity for any subscription, the filesystem one included
        // (ECDS); `--service-node`/`--service-cluster` override it.
        "node": {"id": "azgate", "cluster": "azgate"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": total_connections,
                },
            }],
        },
    });
    if let Some(admin) = &config.admin {
        if !admin.address.ip().is_loopback() {
            return Err(ConfigError::new(
                "admin.address",
                "Envoy's admin interface can stop the server and dump its configuration; \
                 it must listen on loopback",
            ));
        }
        document["admin"] = json!({"address": socket_address(admin.address)});
    }
    Ok(document)
}

fn header(config: &ServeConfig, options: &RenderOptions) -> String {
    let mut header = format!(
        "# Envoy configuration rendered by `azgate envoy-config` from {}.\n\
         # Edit that file and render again rather than editing this one.\n",
        options.source.display()
    );
    if let Some(workers) = config.workers {
        header.push_str(&format!(
            "# workers: {workers} -> start Envoy with --concurrency {workers}\n"
        ));
    }
    if config.clusters.values().any(|c| c.token_service) {
        // The same source, allow-list and limits as `azgate serve` would use in-process.
        let command = config
            .token_source
            .clone()
            .unwrap_or_default()
            .command_line(&options.token_service_address.to_string());
        header.push_str(&format!("# token_service clusters -> run `{command}`\n"));
    }
    header
}

fn envoy_listener(
    index: usize,
    listener: &ListenerConfig,
    route_config: &Value,
    wasm_filter: &Value,
    body_limit: u32,
) -> Result<Value, ConfigError> {
    let field = |name: &str| format!("listeners[{index}].{name}");
    let name = &listener.name;
    // SANITIZE_SET: a client-supplied XFCC is dropped and the verified certificate set, so the
    // filter only ever sees what TLS proved. Behind a trusted TLS front, the front's header is
    // the only source of identity, as `azgate serve` does in that mode.
    let xfcc = if listener.tls.is_some() {
        "SANITIZE_SET"
    } else {
        "ALWAYS_FORWARD_ONLY"
    };
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "use_remote_address": true,
            "forward_client_cert_details": xfcc,
            // Only the certificate (Envoy adds its `Hash`): the filter reads nothing else, and
            // Subject/URI/DNS are text the certificate's holder chose.
            "set_current_client_cert_details": {"cert": true},
            "request_headers_timeout": duration(listener.request_headers_timeout_ms),
            // Covers the body too: the buffer filter holds the request until it is complete.
            "request_timeout": duration(listener.request_timeout_ms),
            "stream_idle_timeout": "300s",
            "max_request_headers_kb": MAX_REQUEST_HEADERS_BYTES / 1024,
            "common_http_protocol_options": {
                "idle_timeout": "300s",
                "headers_with_underscores_action": "REJECT_REQUEST",
                "max_headers_count": MAX_REQUEST_HEADERS,
            },
            // Requests name their target in X-Forwarded-Host; an absolute-form target is a
            // proxy request, which this gateway is not.
            "http_protocol_options": {"allow_absolute_url": false},
            "http2_protocol_options": {
                "max_concurrent_streams": 128,
                "initial_stream_window_size": 65536,
                "initial_connection_window_size": 1048576,
            },
            "access_log": [access_log(name)],
            "local_reply_config": local_replies(),
            "route_config": route_config,
            "http_filters": [
                wasm_filter,
                // After the filter, so a refused request is answered without reading its body;
                // before the router, so nothing goes upstream until the body is complete.
                {
                    "name": "envoy.filters.http.buffer",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                        "max_request_bytes": body_limit,
                    },
                },
                {
                    "name": "envoy.filters.http.dynamic_forward_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                        "dns_cache_config": dns_cache(),
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                        "suppress_envoy_headers": true,
                    },
                },
            ],
        },
    });
    let connection_limit = json!({
        "name": "envoy.filters.network.connection_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
            "stat_prefix": name,
            "max_connections": listener.max_connections,
        },
    });
    let mut chain = json!({"filters": [connection_limit, hcm]});
    if let Some(tls) = &listener.tls {
        let mut validation =
            json!({"trusted_ca": ca_source(&tls.client_ca, &field("tls.client_ca"))?});
        if tls.accept_expired_client_certificates {
            validation["allow_expired_certificate"] = true.into();
        }
        chain["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate":
                    tls.client_certificate == crate::config::ClientCertificateMode::Required,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "tls_certificates": [{
                        "certificate_chain": {"filename": path_text(&tls.cert, &field("tls.cert"))?},
                        "private_key": {"filename": path_text(&tls.key, &field("tls.key"))?},
                    }],
                    "validation_context": validation,
                },
            },
        });
        chain["transport_socket_connect_timeout"] = "10s".into();
    }
    Ok(json!({
        "name": name,
        "address": socket_address(listener.address),
        "per_connection_buffer_limit_bytes": 32768,
        "filter_chains": [chain],
    }))
}

fn wasm_filter(config: &ServeConfig, plugin_config: &[u8]) -> Result<Value, ConfigError> {
    let filter = &config.filter;
    let plugin_config = std::str::from_utf8(plugin_config)
        .map_err(|e| ConfigError::new("filter.config", e.to_string()))?;
    Ok(json!({
        "name": WASM_FILTER_NAME,
        "typed_config": {
            "@type": WASM_TYPE_URL,
            "config": {
                "name": filter.name,
                "root_id": filter.root_id,
                // A filter that cannot run refuses requests; it never lets them through
                // unchecked. A VM that trapped is replaced on the next request, unless that
                // worker's VM was (re)loaded less than the backoff (0.2-0.3 s, jittered) ago:
                // then that request is refused too (an empty 503), as under FAIL_CLOSED.
                "failure_policy": "FAIL_RELOAD",
                "reload_config": {"backoff": {"base_interval": WASM_RELOAD_BACKOFF}},
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config,
                },
                "vm_config": {
                    "vm_id": filter.vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": path_text(&filter.path, "filter.path")?}},
                },
            },
        },
    }))
}

/// One JSON line per request on stdout. No query string (SAS tokens live there), no
/// Authorization, no XFCC; the client is named by its certificate subject.
fn access_log(listener: &str) -> Value {
    json!({
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {
                "json_format": {
                    "time": "%START_TIME%",
                    "listener": listener,
                    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
                    "subject": "%DOWNSTREAM_PEER_SUBJECT%",
                    "method": "%REQ(:METHOD)%",
                    "authority": "%REQ(:AUTHORITY)%",
                    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
                    "protocol": "%PROTOCOL%",
                    "status": "%RESPONSE_CODE%",
                    "azgate_error": "%RESP(X-AZGATE-ERROR)%",
                    "flags": "%RESPONSE_FLAGS%",
                    "upstream": "%UPSTREAM_HOST%",
                    "upstream_cluster": "%UPSTREAM_CLUSTER%",
                    "duration_ms": "%DURATION%",
                    "bytes_received": "%BYTES_RECEIVED%",
                    "bytes_sent": "%BYTES_SENT%",
                    "request_id": "%REQ(X-REQUEST-ID)%",
                },
                "formatters": [{
                    "name": "envoy.formatter.req_without_query",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery",
                    },
                }],
            },
        },
    })
}

/// Envoy's own answers, in the shape and with the codes `azgate serve` uses, so clients see the
/// same errors from either runtime: when Azure cannot be reached or is too slow
/// (`ServeError::UpstreamUnavailable` / `UpstreamTimeout`), and when the request itself is
/// unusable — a request not received in time (`RequestTimeout`), a body over
/// `max_request_body_bytes` (`RequestTooLarge`), a header block over the limits
/// (`RequestHeaderFieldsTooLarge`), a target that is not a path (`InvalidRequestTarget`, 400 as
/// serve and the filter answer it, not Envoy's 404), a transfer coding Envoy does not implement (`BadRequest`,
/// 400 as serve answers it, not Envoy's 501). Matched by Envoy's response flags, or by statuses
/// the filter never answers with, so the filter's own answers are left as they are.
///
/// Not rewritable: the HTTP/1.1 codec's other errors (malformed chunks, conflicting or repeated
/// lengths) are a plain-text 400 `Bad Request`: their `DPE` flag is set only after the reply is
/// rendered, and status 400 alone would also match the filter's answers.
fn local_replies() -> Value {
    let mapper = |filter: Value, status: u16, code: &str, message: &str| {
        json!({
            "filter": filter,
            "status_code": status,
            "headers_to_add": [{
                "header": {"key": "x-azgate-error", "value": code},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }],
            "body_format_override": {
                "json_format": {"error": {"code": code, "message": message}},
                "content_type": "application/json",
            },
        })
    };
    let flags = |flags: &[&str]| json!({"response_flag_filter": {"flags": flags}});
    let status = |code: u16| {
        json!({"status_code_filter": {"comparison": {
            "op": "EQ",
            "value": {"default_value": code, "runtime_key": format!("azgate.local_reply.{code}")},
        }}})
    };
    json!({
        "mappers": [
            // request_headers_timeout and request_timeout.
            mapper(
                status(408),
                408,
                "RequestTimeout",
                "azgate: the request was not received in time",
            ),
            // The buffer filter's limit.
            mapper(status(413), 413, "RequestTooLarge", "azgate: the request body is too large"),
            mapper(
                status(431),
                431,
                "RequestHeaderFieldsTooLarge",
                "azgate: the request header block is too large",
            ),
            // The connection manager's own refusal of a target that is not a path
            // (`absolute_path_rejected`: `OPTIONS *`, absolute-form with `allow_absolute_url`
            // off). Every path matches the one route, so Envoy sends no other 404 itself.
            mapper(
                status(404),
                400,
                "InvalidRequestTarget",
                "azgate: the request target must be a path starting with /",
            ),
            mapper(
                status(501),
                400,
                "BadRequest",
                "azgate: the request is malformed (%RESPONSE_CODE_DETAILS%)",
            ),
            mapper(
                flags(&["DF", "UF", "UH", "URX", "UO", "UR", "UC"]),
                503,
                "UpstreamUnavailable",
                "azgate: Azure could not be reached: %LOCAL_REPLY_BODY%",
            ),
            mapper(flags(&["UT"]), 504, "UpstreamTimeout", "azgate: Azure did not answer in time"),
        ],
    })
}

/// The DNS cache shared by the forward-proxy filter and cluster (they must be identical).
fn dns_cache() -> Value {
    json!({
        "name": "azure_dns",
        "dns_lookup_family": "V4_PREFERRED",
        "max_hosts": 1024,
        "host_ttl": "300s",
    })
}

/// HTTP/2 or HTTP/1.1 by ALPN; SNI and certificate name check from the `:authority` the filter
/// set.
fn azure_protocol_options() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
            "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
        },
    })
}

fn upstream_tls(trusted_ca: &Value, sni: Option<&str>) -> Value {
    let mut context = json!({
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "validation_context": {"trusted_ca": trusted_ca},
        },
    });
    if let Some(sni) = sni {
        context["sni"] = sni.into();
    }
    context["@type"] =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext".into();
    json!({"name": "envoy.transport_sockets.tls", "typed_config": context})
}

/// The system bundle, by file name; with `upstream.extra_ca`, the bundle and the extra CAs
/// inline (Envoy takes one trusted-CA source).
fn upstream_trusted_ca(
    config: &ServeConfig,
    options: &RenderOptions,
) -> Result<Value, ConfigError> {
    let system = match &options.system_ca_file {
        Some(file) => file.clone(),
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .ok_or_else(|| {
                ConfigError::new(
                    "--system-ca-file",
                    format!(
                        "no system CA bundle found (tried {}); name one",
                        SYSTEM_CA_BUNDLES.join(", ")
                    ),
                )
            })?,
    };
    if config.upstream.extra_ca.is_empty() {
        return Ok(json!({"filename": path_text(&system, "--system-ca-file")?}));
    }
    let mut files = vec![system];
    files.extend(config.upstream.extra_ca.iter().cloned());
    ca_source(&files, "upstream.extra_ca")
}

/// One file by name, several concatenated inline.
fn ca_source(files: &[PathBuf], field: &str) -> Result<Value, ConfigError> {
    match files {
        [] => Err(ConfigError::new(field, "at least one CA file is required")),
        [one] => Ok(json!({"filename": path_text(one, field)?})),
        several => {
            let mut pem = String::new();
            for file in several {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| ConfigError::new(field, format!("{}: {e}", file.display())))?;
                pem.push_str(text.trim_end());
                pem.push('\n');
            }
            Ok(json!({"inline_string": pem}))
        }
    }
}

fn path_text(path: &Path, field: &str) -> Result<String, ConfigError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| ConfigError::new(field, format!("{} is not UTF-8", path.display())))
}

/// An Envoy address: a socket address, or a pipe for a unix socket.
fn address_of(address: &ListenAddress) -> Value {
    match address {
        ListenAddress::Tcp(address) => socket_address(*address),
        ListenAddress::Unix(path) => json!({"pipe": {"path": path.to_string_lossy()}}),
    }
}

fn socket_address(address: SocketAddr) -> Value {
    json!({"socket_address": {"address": address.ip().to_string(), "port_value": address.port()}})
}

/// A protobuf `Duration` in Envoy's YAML form, from milliseconds.
fn duration(ms: u64) -> String {
    format!("{}s", ms as f64 / 1000.0)
}

/// [`duration`] of a `Duration` (whole milliseconds, as `azgate.yaml` gives them).
fn seconds(duration: std::time::Duration) -> String {
    self::duration(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
