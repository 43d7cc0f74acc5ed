//! What the filter asks of its host, as one small trait, and its proxy-wasm implementation.
//!
//! The broker and the request contexts call the host only through [`Host`], so their state
//! machine runs natively in unit tests against a fake host with a fake clock. [`ProxyWasm`] (wasm32
//! only) is the one place that calls `proxy_wasm::hostcalls`. This module imports nothing of the
//! filter's glue: it is a leaf.

use std::time::Duration;

use proxy_wasm::types::{LogLevel, Status};

use crate::token_cache::SharedStore;

/// The host calls the filter's per-request logic needs. Shared data comes through
/// [`SharedStore`].
pub trait Host: SharedStore {
    /// Wall-clock Unix milliseconds. A failing clock yields 0, which every time check treats
    /// as "not valid yet": fail closed.
    fn now_ms(&self) -> i64;
    /// Logs at `level`; failures are ignored (there is nowhere else to report them).
    fn log(&self, level: LogLevel, message: &str);
    /// Starts an HTTP call-out to `cluster`; the answer arrives as a call response with the
    /// returned token.
    fn dispatch_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status>;
    /// A header of the call-out answer being delivered, as bytes.
    fn call_response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The first `size` bytes of the call-out answer's body.
    fn call_response_body(&self, size: usize) -> Vec<u8>;
    /// A header of the upstream response of the effective request, as bytes.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets (or, with `None`, removes) a request header of the effective request.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), Status>;
    /// Answers the effective request locally.
    fn send_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status>;
    /// Makes `context_id` the effective request (its stream may be gone: an error).
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status>;
    /// Resumes the effective (paused) request.
    fn resume_request(&self) -> Result<(), Status>;
    /// Sets the root context's tick period (`Duration::ZERO` stops it).
    fn set_tick_period(&self, period: Duration) -> Result<(), Status>;
}

/// The proxy-wasm host: Envoy or `azgate serve`.
#[cfg(target_arch = "wasm32")]
pub struct ProxyWasm;

#[cfg(target_arch = "wasm32")]
mod proxy_wasm_host {
    use std::time::{Duration, UNIX_EPOCH};

    use proxy_wasm::hostcalls;
    use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

    use super::{Host, ProxyWasm};
    use crate::error::Refusal;
    use crate::token_cache::SharedStore;

    impl SharedStore for ProxyWasm {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            hostcalls::get_shared_data(key).unwrap_or((None, None))
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal> {
            match hostcalls::set_shared_data(key, Some(value), cas) {
                Ok(()) => Ok(true),
                Err(Status::CasMismatch) => Ok(false),
                Err(status) => Err(Refusal::Internal(format!(
                    "shared data write failed ({status:?})"
                ))),
            }
        }
    }

    // Header values are read as bytes throughout: the SDK's string API traps on a non-UTF-8
    // value, and neither the client's nor the token service's bytes are ours.
    impl Host for ProxyWasm {
        fn now_ms(&self) -> i64 {
            hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_millis()).ok())
                .unwrap_or(0)
        }

        fn log(&self, level: LogLevel, message: &str) {
            let _ = hostcalls::log(level, message);
        }

        fn dispatch_call(
            &self,
            cluster: &str,
            headers: Vec<(&str, &str)>,
            timeout: Duration,
        ) -> Result<u32, Status> {
            hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout)
        }

        fn call_response_header(&self, name: &str) -> Option<Vec<u8>> {
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
                .ok()
                .flatten()
        }

        fn call_response_body(&self, size: usize) -> Vec<u8> {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default()
        }

        fn response_header(&self, name: &str) -> Option<Vec<u8>> {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
                .ok()
                .flatten()
        }

        fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), Status> {
            hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value)
        }

        fn send_response(
            &self,
            status: u32,
            headers: Vec<(&str, &str)>,
            body: &[u8],
        ) -> Result<(), Status> {
            hostcalls::send_http_response(status, headers, Some(body))
        }

        fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
            hostcalls::set_effective_context(context_id)
        }

        fn resume_request(&self) -> Result<(), Status> {
            hostcalls::resume_http_request()
        }

        fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
            hostcalls::set_tick_period(period)
        }
    }
}
