//! Host functions: stream control and local responses.

use wasmtime::Linker;

use super::Ctx;
use super::memory::{read, read_string};
use crate::abi::{self, status};
use crate::state::{HostState, LocalResponse, StreamAction};

fn push_action(caller: &mut Ctx<'_>, action: StreamAction) -> i32 {
    let state = caller.data_mut();
    if !state.streams.contains_key(&state.effective) {
        return status::BAD_ARGUMENT;
    }
    let id = state.effective;
    state.effects.actions.push((id, action));
    status::OK
}

pub(super) fn add_stream_control(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Ctx<'_>, kind: i32| -> wasmtime::Result<i32> {
            if !(0..=1).contains(&kind) {
                // Envoy answers Unimplemented for L4 streams; the Rust SDK does not know
                // that status, so this host says BadArgument.
                return Ok(status::BAD_ARGUMENT);
            }
            let status = push_action(&mut caller, StreamAction::Continue(kind));
            // Envoy lets go of the request's maps at once (for either direction).
            if let Some(stream) = caller.data_mut().effective_stream_mut() {
                stream.request_headers_open = false;
            }
            Ok(status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: Ctx<'_>, kind: i32| -> wasmtime::Result<i32> {
            Ok(push_action(&mut caller, StreamAction::Close(kind)))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Ctx<'_>,
         code: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32|
         -> wasmtime::Result<i32> {
            let details = read_string(&caller, details_ptr, details_len)?;
            let body = read(&caller, body_ptr, body_len)?;
            let Some(headers) = abi::deserialize_pairs(&read(&caller, headers_ptr, headers_len)?)
            else {
                return Ok(status::PARSE_FAILURE);
            };
            let Ok(status_code) = u16::try_from(code) else {
                return Ok(status::BAD_ARGUMENT);
            };
            if !(200..=599).contains(&status_code) {
                return Ok(status::BAD_ARGUMENT);
            }
            let response = LocalResponse {
                status: status_code,
                details,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
                    .collect(),
                body,
            };
            Ok(push_action(
                &mut caller,
                StreamAction::LocalResponse(response),
            ))
        },
    )?;
    Ok(())
}
