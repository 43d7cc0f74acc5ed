//! What a VM's host functions act on: the streams (contexts) and their headers, the call-out
//! response being delivered, the effects a callback leaves for the gateway to carry out, and
//! the plugin's read-only facts ([`PluginShared`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime::{Memory, TypedFunc};

use crate::shared::{Metrics, QueueReady, SharedData, SharedQueues};

/// A header list: lower-case names, raw values, in order, repeats allowed.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Connection and request facts exposed as properties.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// The listener's address.
    pub destination: Option<SocketAddr>,
    /// The client presented a verified certificate.
    pub mtls: bool,
    /// The client certificate's subject (RFC 2253).
    pub peer_subject: Option<String>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// A unique request id.
    pub request_id: String,
    /// When the request arrived.
    pub started: Option<SystemTime>,
    /// The downstream connection's process-unique id.
    pub connection_id: Option<u64>,
    /// The negotiated TLS version (`TLSv1.3`, `TLSv1.2`).
    pub tls_version: Option<String>,
    /// SHA-256 of the client certificate (DER), lower-case hex.
    pub peer_certificate_sha256: Option<String>,
    /// The subject (RFC 4514) of the certificate this gateway presented.
    pub local_subject: Option<String>,
}

/// One HTTP stream's state.
#[derive(Debug, Default)]
pub struct Stream {
    /// Request headers, including pseudo-headers.
    pub request_headers: HeaderList,
    /// Request trailers.
    pub request_trailers: HeaderList,
    /// Response headers, once known.
    pub response_headers: HeaderList,
    /// Response trailers.
    pub response_trailers: HeaderList,
    /// Facts for properties.
    pub info: StreamInfo,
    /// Properties the filter set (`proxy_set_property`), by `\0`-joined path: Envoy keeps them
    /// in the stream's filter state, readable by later `proxy_get_property` calls.
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    /// The request header map is offered to the filter. Envoy offers it during
    /// `proxy_on_request_headers` and, when that paused (or answered), until a
    /// `proxy_continue_stream`; otherwise only for reading in `proxy_on_log`. The
    /// header-derived `request.*` properties follow it.
    pub(crate) request_headers_open: bool,
    /// The same for the response header map and `proxy_on_response_headers`.
    pub(crate) response_headers_open: bool,
}

/// What the filter asked to happen to a stream; carried out after the callback returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamAction {
    /// `proxy_continue_stream` for the request (0) or response (1).
    Continue(i32),
    /// `proxy_close_stream`.
    Close(i32),
    /// `proxy_send_local_response`.
    LocalResponse(LocalResponse),
}

/// A response made by the filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// Envoy's "details" string (for logs).
    pub details: String,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

/// A call-out the filter dispatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    /// Token delivered back with the response.
    pub token: u32,
    /// Cluster name.
    pub cluster: String,
    /// Headers, including `:method`, `:path`, `:authority`.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Timeout; `None` = none (the ABI's 0).
    pub timeout: Option<Duration>,
}

/// The answer to a call-out, as delivered to the filter. Envoy's router answers a connect
/// failure or a reset before the response headers itself ([`CallResponse::upstream_reset`], a
/// 503) and a timeout with a 504 ([`CallResponse::timed_out`]); only a failure after the
/// headers reaches the filter as [`CallResponse::failed`]: no headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallResponse {
    /// Headers, including `:status`; empty for a failure.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl CallResponse {
    /// A failure with no answer to deliver (e.g. a reset after the response headers): no
    /// headers; the filter's `proxy_get_status` reports (11, "reset").
    pub fn failed() -> Self {
        Self::default()
    }

    /// Envoy's answer when the connection fails or is reset before the response headers: a 503
    /// made by its router, e.g. with `reason` "remote connection failure" (connect refused) or
    /// "connection termination" (closed without an answer).
    pub fn upstream_reset(reason: &str) -> Self {
        let body = format!(
            "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
        )
        .into_bytes();
        Self {
            headers: vec![
                (":status".into(), b"503".to_vec()),
                ("content-length".into(), body.len().to_string().into_bytes()),
                ("content-type".into(), b"text/plain".to_vec()),
            ],
            body,
            trailers: Vec::new(),
        }
    }

    /// Envoy's answer when a call-out times out: a 504 made by its router.
    pub fn timed_out() -> Self {
        let body = b"upstream request timeout".to_vec();
        Self {
            headers: vec![
                (":status".into(), b"504".to_vec()),
                ("content-length".into(), body.len().to_string().into_bytes()),
                ("content-type".into(), b"text/plain".to_vec()),
            ],
            body,
            trailers: Vec::new(),
        }
    }
}

/// Everything a callback asked for.
#[derive(Debug, Default)]
pub struct Effects {
    /// Stream actions, in order.
    pub actions: Vec<(u32, StreamAction)>,
    /// Call-outs to start.
    pub calls: Vec<HttpCall>,
    /// A new tick period (zero disables).
    pub tick_period: Option<Duration>,
    /// Queues that got data.
    pub queue_ready: Vec<QueueReady>,
}

/// Which callback is running, for the buffers that exist only during one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Other,
    VmStart,
    Configure,
}

/// The store data of one VM.
pub(crate) struct HostState {
    pub(crate) plugin: Arc<PluginShared>,
    /// Unique id of this VM (for queue ownership).
    pub(crate) vm_uid: u64,
    pub(crate) root_id: u32,
    pub(crate) effective: u32,
    pub(crate) streams: HashMap<u32, Stream>,
    pub(crate) phase: Phase,
    pub(crate) call_response: Option<CallResponse>,
    pub(crate) effects: Effects,
    pub(crate) next_call_token: u32,
    pub(crate) last_status: (u32, Vec<u8>),
    pub(crate) memory: Option<Memory>,
    pub(crate) allocate: Option<TypedFunc<i32, i32>>,
    /// `proxy_done` was called by the root context.
    pub(crate) done_called: bool,
    /// `proxy_on_log` is running: Envoy's access-log phase, where the stream's header maps can
    /// be read but not changed.
    pub(crate) access_log: bool,
    /// The plugin configuration `proxy_on_configure` is reading (buffer 7), set for that call.
    pub(crate) configuration: Option<Arc<Vec<u8>>>,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<PluginShared>, vm_uid: u64, root_id: u32) -> Self {
        Self {
            plugin,
            vm_uid,
            root_id,
            effective: root_id,
            streams: HashMap::new(),
            phase: Phase::Other,
            call_response: None,
            effects: Effects::default(),
            next_call_token: 0,
            last_status: (0, Vec::new()),
            memory: None,
            allocate: None,
            done_called: false,
            access_log: false,
            configuration: None,
        }
    }

    /// The stream the effective context names, if it is a stream.
    pub(crate) fn effective_stream(&self) -> Option<&Stream> {
        self.streams.get(&self.effective)
    }

    pub(crate) fn effective_stream_mut(&mut self) -> Option<&mut Stream> {
        self.streams.get_mut(&self.effective)
    }
}

/// Read-only plugin facts every host function may need.
#[derive(Debug)]
pub(crate) struct PluginShared {
    pub(crate) name: String,
    pub(crate) root_id: String,
    pub(crate) vm_id: String,
    /// The current plugin configuration: what a new VM is configured with, and what
    /// [`Vm::reconfigure`] hands a running one ([`Plugin::set_plugin_config`] replaces it).
    pub(crate) plugin_config: Mutex<Arc<Vec<u8>>>,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) clusters: HashSet<String>,
    pub(crate) log_level: u32,
    pub(crate) shared_data: Arc<SharedData>,
    pub(crate) queues: Arc<SharedQueues>,
    pub(crate) metrics: Arc<Metrics>,
}

impl PluginShared {
    pub(crate) fn current_config_slot(&self) -> std::sync::MutexGuard<'_, Arc<Vec<u8>>> {
        // A poisoned lock still holds a whole configuration (it is replaced in one assignment).
        self.plugin_config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn current_config(&self) -> Arc<Vec<u8>> {
        self.current_config_slot().clone()
    }
}
