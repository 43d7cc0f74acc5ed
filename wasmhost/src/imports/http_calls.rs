//! Host functions: HTTP call-outs.

use std::time::Duration;

use wasmtime::Linker;

use super::Ctx;
use super::memory::{copy_out, read, read_string, write_u32};
use crate::abi::{self, status};
use crate::state::{HostState, HttpCall};

pub(super) fn add_http_calls(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: Ctx<'_>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> wasmtime::Result<i32> {
            let cluster = read_string(&caller, upstream_ptr, upstream_len)?;
            let headers = abi::deserialize_pairs(&read(&caller, headers_ptr, headers_len)?);
            let trailers = abi::deserialize_pairs(&read(&caller, trailers_ptr, trailers_len)?);
            let body = read(&caller, body_ptr, body_len)?;
            let (Some(headers), Some(trailers)) = (headers, trailers) else {
                return Ok(status::PARSE_FAILURE);
            };
            let lower = |pairs: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
                pairs
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
                    .collect()
            };
            let headers = lower(headers);
            // Envoy: unknown cluster or a missing :method/:path/:authority is BadArgument.
            let has = |name: &str| headers.iter().any(|(k, v)| k == name && !v.is_empty());
            let known = caller.data().plugin.clusters.contains(&cluster);
            let complete = has(":method") && has(":path") && has(":authority");
            if !known || !complete || timeout_ms < 0 {
                return Ok(status::BAD_ARGUMENT);
            }
            let state = caller.data_mut();
            state.next_call_token = state.next_call_token.wrapping_add(1).max(1);
            let token = state.next_call_token;
            state.effects.calls.push(HttpCall {
                token,
                cluster,
                headers,
                body,
                trailers: lower(trailers),
                timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64)),
            });
            write_u32(&mut caller, token_ptr, token)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: Ctx<'_>,
         code_ptr: i32,
         msg_ptr_ptr: i32,
         msg_size_ptr: i32|
         -> wasmtime::Result<i32> {
            let (code, message) = caller.data().last_status.clone();
            write_u32(&mut caller, code_ptr, code)?;
            copy_out(&mut caller, &message, msg_ptr_ptr, msg_size_ptr)?;
            Ok(status::OK)
        },
    )?;
    Ok(())
}
