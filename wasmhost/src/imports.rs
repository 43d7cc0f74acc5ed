//! The host functions a proxy-wasm 0.2.x module imports (`env.proxy_*` and the WASI preview1
//! calls a `wasm32-wasip1` module needs), with Envoy's semantics.
//!
//! Guest memory is only touched through [`read`], [`write`] and [`copy_out`], which check every
//! pointer and length: a miss is a trap (an `Err`), never a panic and never status 6, which the
//! Rust SDK does not know.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker, Memory, bail, format_err};

use crate::abi::{self, BufferType, MapType, status};
use crate::shared::{MetricError, MetricKind, SetOutcome};
use crate::state::{HeaderList, HostState, HttpCall, LocalResponse, Phase, StreamAction};

type Ctx<'a> = Caller<'a, HostState>;

/// Registers every host function on `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    add_logging_and_time(linker)?;
    add_buffers(linker)?;
    add_header_maps(linker)?;
    add_stream_control(linker)?;
    add_http_calls(linker)?;
    add_shared_state(linker)?;
    add_properties(linker)?;
    add_unsupported(linker)?;
    add_wasi(linker, "wasi_snapshot_preview1")?;
    add_wasi(linker, "wasi_unstable")?;
    Ok(())
}

// === guest memory ===

fn memory(caller: &Ctx<'_>) -> wasmtime::Result<Memory> {
    caller
        .data()
        .memory
        .ok_or_else(|| format_err!("the module exports no memory"))
}

fn range(ptr: i32, len: i32) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or_else(|| format_err!("guest pointer/length overflows"))?;
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory.
fn read(caller: &Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    mem.data(caller)
        .get(range(ptr, len)?)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format_err!("guest pointer/length out of bounds"))
}

fn read_string(caller: &Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

/// Writes `bytes` at `ptr` in guest memory.
fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(caller)?;
    let target = mem
        .data_mut(&mut *caller)
        .get_mut(range(ptr, bytes.len() as i32)?)
        .ok_or_else(|| format_err!("guest pointer out of bounds"))?;
    target.copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> wasmtime::Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the guest: allocated with its own allocator at exactly their size (the Rust
/// SDK frees them with `Vec::from_raw_parts(ptr, size, size)`), or ptr=0, size=0 when empty.
fn copy_out(
    caller: &mut Ctx<'_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<()> {
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let len = i32::try_from(bytes.len()).map_err(|_| format_err!("buffer too large"))?;
    // Taken out and put back rather than cloned: cloning a typed function handle costs a
    // type-registry round trip on every buffer handed to the guest.
    let allocate = caller
        .data_mut()
        .allocate
        .take()
        .ok_or_else(|| format_err!("the module exports no allocator"))?;
    let result = allocate.call(&mut *caller, len);
    caller.data_mut().allocate = Some(allocate);
    let ptr = result?;
    if ptr == 0 {
        bail!("the guest allocator failed for {len} bytes");
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ptr_ptr, ptr as u32)?;
    write_u32(caller, size_ptr, len as u32)
}

// === logging, time, ticks, done, effective context ===

fn add_logging_and_time(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |caller: Ctx<'_>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let message = read_string(&caller, ptr, len)?;
            let plugin = &caller.data().plugin.name;
            match level {
                0 => tracing::trace!(target: "wasm", plugin, "{message}"),
                1 => tracing::debug!(target: "wasm", plugin, "{message}"),
                2 => tracing::info!(target: "wasm", plugin, "{message}"),
                3 => tracing::warn!(target: "wasm", plugin, "{message}"),
                _ => tracing::error!(target: "wasm", plugin, level = abi::log_level_name(level), "{message}"),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Ctx<'_>, ret: i32| -> wasmtime::Result<i32> {
            let level = caller.data().plugin.log_level;
            write_u32(&mut caller, ret, level)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Ctx<'_>, ret: i32| -> wasmtime::Result<i32> {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            write(&mut caller, ret, &now.to_le_bytes())?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: Ctx<'_>, period: i32| -> wasmtime::Result<i32> {
            caller.data_mut().effects.tick_period =
                Some(Duration::from_millis(u64::from(period as u32)));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_done",
        |mut caller: Ctx<'_>| -> wasmtime::Result<i32> {
            caller.data_mut().done_called = true;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: Ctx<'_>, id: i32| -> wasmtime::Result<i32> {
            let id = id as u32;
            let state = caller.data_mut();
            if id == state.root_id || state.streams.contains_key(&id) {
                state.effective = id;
                Ok(status::OK)
            } else {
                Ok(status::BAD_ARGUMENT)
            }
        },
    )?;
    Ok(())
}

// === buffers ===

fn buffer(state: &HostState, kind: BufferType) -> Option<&[u8]> {
    match kind {
        BufferType::HttpCallResponseBody => state.call_response.as_ref().map(|r| r.body.as_slice()),
        BufferType::VmConfiguration if state.phase == Phase::VmStart => {
            Some(state.plugin.vm_config.as_slice())
        }
        BufferType::PluginConfiguration if state.phase == Phase::Configure => {
            state.configuration.as_ref().map(|c| c.as_slice())
        }
        _ => None,
    }
}

fn add_buffers(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Ctx<'_>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let Some(kind) = BufferType::from_raw(kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(bytes) = buffer(caller.data(), kind) else {
                return Ok(status::NOT_FOUND);
            };
            // 64-bit arithmetic: the SDK asks for max = u32::MAX to mean "everything".
            let start = u64::from(start as u32);
            let max = u64::from(max as u32);
            if start.checked_add(max).is_none() {
                return Ok(status::BAD_ARGUMENT);
            }
            let len = bytes.len() as u64;
            let from = start.min(len) as usize;
            let to = (start + max).min(len) as usize;
            let slice = bytes[from..to].to_vec();
            copy_out(&mut caller, &slice, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut caller: Ctx<'_>, kind: i32, size_ptr: i32, flags_ptr: i32| -> wasmtime::Result<i32> {
            let Some(kind) = BufferType::from_raw(kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(len) = buffer(caller.data(), kind).map(<[u8]>::len) else {
                return Ok(status::NOT_FOUND);
            };
            write_u32(&mut caller, size_ptr, len as u32)?;
            write_u32(&mut caller, flags_ptr, 0)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |_caller: Ctx<'_>,
         _kind: i32,
         _start: i32,
         _size: i32,
         _ptr: i32,
         _len: i32|
         -> wasmtime::Result<i32> {
            // Bodies are not buffered by this host; nothing is writable.
            Ok(status::NOT_FOUND)
        },
    )?;
    Ok(())
}

// === header maps ===

/// The map for reading, if Envoy would offer it now (see `Stream::request_headers_open`).
fn map(state: &HostState, kind: MapType) -> Option<&HeaderList> {
    match kind {
        MapType::RequestHeaders => state
            .effective_stream()
            .filter(|s| s.request_headers_open || state.access_log)
            .map(|s| &s.request_headers),
        MapType::RequestTrailers => state.effective_stream().map(|s| &s.request_trailers),
        MapType::ResponseHeaders => state
            .effective_stream()
            .filter(|s| s.response_headers_open || state.access_log)
            .map(|s| &s.response_headers),
        MapType::ResponseTrailers => state.effective_stream().map(|s| &s.response_trailers),
        MapType::HttpCallResponseHeaders => state
            .call_response
            .as_ref()
            .filter(|r| !r.headers.is_empty())
            .map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => state
            .call_response
            .as_ref()
            .filter(|r| !r.headers.is_empty())
            .map(|r| &r.trailers),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
    }
}

/// The map for changing, if Envoy would offer it now (never during `proxy_on_log`).
fn map_mut(state: &mut HostState, kind: MapType) -> Option<&mut HeaderList> {
    if state.access_log {
        return None;
    }
    let stream = state.effective_stream_mut()?;
    match kind {
        MapType::RequestHeaders => stream
            .request_headers_open
            .then_some(&mut stream.request_headers),
        MapType::RequestTrailers => Some(&mut stream.request_trailers),
        MapType::ResponseHeaders => stream
            .response_headers_open
            .then_some(&mut stream.response_headers),
        MapType::ResponseTrailers => Some(&mut stream.response_trailers),
        _ => None,
    }
}

/// Envoy lower-cases every key that crosses the ABI.
fn key(caller: &Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(read_string(caller, ptr, len)?.to_ascii_lowercase())
}

fn add_header_maps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Ctx<'_>, kind: i32, ptr_ptr: i32, size_ptr: i32| -> wasmtime::Result<i32> {
            let Some(kind) = MapType::from_raw(kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // A map Envoy does not offer now reads as empty.
            let bytes = map(caller.data(), kind)
                .map(|headers| abi::serialize_pairs(headers))
                .unwrap_or_default();
            copy_out(&mut caller, &bytes, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut caller: Ctx<'_>, kind: i32, size_ptr: i32| -> wasmtime::Result<i32> {
            let Some(headers) = MapType::from_raw(kind).and_then(|k| map(caller.data(), k)) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // Envoy returns HeaderMap::byteSize(): the sum of key and value lengths.
            let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            write_u32(&mut caller, size_ptr, size as u32)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Ctx<'_>, kind: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let bytes = read(&caller, ptr, len)?;
            let Some(pairs) = abi::deserialize_pairs(&bytes) else {
                return Ok(status::PARSE_FAILURE);
            };
            let Some(headers) = MapType::from_raw(kind).and_then(|k| map_mut(caller.data_mut(), k))
            else {
                return Ok(status::BAD_ARGUMENT);
            };
            *headers = pairs
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
                .collect();
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Ctx<'_>,
         kind: i32,
         key_ptr: i32,
         key_len: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let name = key(&caller, key_ptr, key_len)?;
            let Some(kind) = MapType::from_raw(kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(headers) = map(caller.data(), kind) else {
                // Envoy: NOT_FOUND in the access-log phase, BAD_ARGUMENT otherwise.
                return Ok(if caller.data().access_log {
                    status::NOT_FOUND
                } else {
                    status::BAD_ARGUMENT
                });
            };
            // Envoy returns the first value only.
            let Some(value) = headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
            else {
                return Ok(status::NOT_FOUND);
            };
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut caller: Ctx<'_>,
         kind: i32,
         kp: i32,
         kl: i32,
         vp: i32,
         vl: i32|
         -> wasmtime::Result<i32> {
            let name = key(&caller, kp, kl)?;
            let value = read(&caller, vp, vl)?;
            let Some(headers) = MapType::from_raw(kind).and_then(|k| map_mut(caller.data_mut(), k))
            else {
                return Ok(status::BAD_ARGUMENT);
            };
            headers.push((name, value));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut caller: Ctx<'_>,
         kind: i32,
         kp: i32,
         kl: i32,
         vp: i32,
         vl: i32|
         -> wasmtime::Result<i32> {
            let name = key(&caller, kp, kl)?;
            let value = read(&caller, vp, vl)?;
            let Some(headers) = MapType::from_raw(kind).and_then(|k| map_mut(caller.data_mut(), k))
            else {
                return Ok(status::BAD_ARGUMENT);
            };
            // One value remains, where the first one was (or at the end).
            match headers.iter().position(|(k, _)| *k == name) {
                Some(first) => {
                    headers[first].1 = value;
                    let mut index = 0;
                    headers.retain(|(k, _)| {
                        let keep = *k != name || index == first;
                        index += 1;
                        keep
                    });
                }
                None => headers.push((name, value)),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Ctx<'_>, kind: i32, kp: i32, kl: i32| -> wasmtime::Result<i32> {
            let name = key(&caller, kp, kl)?;
            let Some(headers) = MapType::from_raw(kind).and_then(|k| map_mut(caller.data_mut(), k))
            else {
                return Ok(status::BAD_ARGUMENT);
            };
            headers.retain(|(k, _)| *k != name);
            Ok(status::OK)
        },
    )?;
    Ok(())
}

// === stream control and local responses ===

fn push_action(caller: &mut Ctx<'_>, action: StreamAction) -> i32 {
    let state = caller.data_mut();
    if !state.streams.contains_key(&state.effective) {
        return status::BAD_ARGUMENT;
    }
    let id = state.effective;
    state.effects.actions.push((id, action));
    status::OK
}

fn add_stream_control(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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

// === HTTP call-outs ===

fn add_http_calls(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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

// === shared data, queues, metrics ===

fn add_shared_state(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Ctx<'_>,
         kp: i32,
         kl: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&caller, kp, kl)?;
            let Some((value, cas)) = caller.data().plugin.shared_data.get(&key) else {
                return Ok(status::NOT_FOUND);
            };
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)?;
            write_u32(&mut caller, cas_ptr, cas)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |caller: Ctx<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> wasmtime::Result<i32> {
            let key = read_string(&caller, kp, kl)?;
            let value = read(&caller, vp, vl)?;
            Ok(
                match caller
                    .data()
                    .plugin
                    .shared_data
                    .set(&key, &value, cas as u32)
                {
                    SetOutcome::Written => status::OK,
                    SetOutcome::CasMismatch => status::CAS_MISMATCH,
                },
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Ctx<'_>, np: i32, nl: i32, ret: i32| -> wasmtime::Result<i32> {
            let name = read_string(&caller, np, nl)?;
            let state = caller.data();
            let id = state.plugin.queues.register(
                &state.plugin.vm_id,
                &name,
                state.vm_uid,
                state.root_id,
            );
            write_u32(&mut caller, ret, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Ctx<'_>,
         vp: i32,
         vl: i32,
         np: i32,
         nl: i32,
         ret: i32|
         -> wasmtime::Result<i32> {
            let vm_id = read_string(&caller, vp, vl)?;
            let name = read_string(&caller, np, nl)?;
            let vm_id = if vm_id.is_empty() {
                caller.data().plugin.vm_id.clone()
            } else {
                vm_id
            };
            let Some(id) = caller.data().plugin.queues.resolve(&vm_id, &name) else {
                return Ok(status::NOT_FOUND);
            };
            write_u32(&mut caller, ret, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut caller: Ctx<'_>, id: i32, vp: i32, vl: i32| -> wasmtime::Result<i32> {
            let value = read(&caller, vp, vl)?;
            let Some(ready) = caller.data().plugin.queues.enqueue(id as u32, &value) else {
                return Ok(status::NOT_FOUND);
            };
            caller.data_mut().effects.queue_ready.push(ready);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Ctx<'_>, id: i32, ptr_ptr: i32, size_ptr: i32| -> wasmtime::Result<i32> {
            match caller.data().plugin.queues.dequeue(id as u32) {
                None => Ok(status::NOT_FOUND),
                Some(None) => Ok(status::EMPTY),
                Some(Some(value)) => {
                    copy_out(&mut caller, &value, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Ctx<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> wasmtime::Result<i32> {
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let name = read_string(&caller, np, nl)?;
            let id = caller.data().plugin.metrics.define(kind, &name);
            write_u32(&mut caller, ret, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Ctx<'_>, id: i32, delta: i64| -> wasmtime::Result<i32> {
            Ok(metric_status(
                caller.data().plugin.metrics.increment(id as u32, delta),
            ))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Ctx<'_>, id: i32, value: i64| -> wasmtime::Result<i32> {
            Ok(metric_status(
                caller.data().plugin.metrics.record(id as u32, value),
            ))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Ctx<'_>, id: i32, ret: i32| -> wasmtime::Result<i32> {
            let value = match caller.data().plugin.metrics.value(id as u32) {
                Ok(value) => value,
                Err(error) => return Ok(metric_status(Err(error))),
            };
            write(&mut caller, ret, &(value as u64).to_le_bytes())?;
            Ok(status::OK)
        },
    )?;
    Ok(())
}

/// The status for a metric call's outcome.
fn metric_status(outcome: Result<(), MetricError>) -> i32 {
    match outcome {
        Ok(()) => status::OK,
        Err(MetricError::NotFound) => status::NOT_FOUND,
        Err(MetricError::BadArgument) => status::BAD_ARGUMENT,
    }
}

// === properties ===

fn add_properties(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Ctx<'_>,
         pp: i32,
         pl: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let path = read(&caller, pp, pl)?;
            let parts: Vec<String> = path
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let Some(value) = crate::properties::lookup(caller.data(), &parts) else {
                return Ok(status::NOT_FOUND);
            };
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Ctx<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> wasmtime::Result<i32> {
            // Envoy keeps these in the stream's filter state; without a stream there is none.
            let path = read(&caller, pp, pl)?;
            let value = read(&caller, vp, vl)?;
            let Some(stream) = caller.data_mut().effective_stream_mut() else {
                return Ok(status::NOT_FOUND);
            };
            stream.properties.insert(path, value);
            Ok(status::OK)
        },
    )?;
    Ok(())
}

// === not supported: gRPC, foreign functions ===

fn add_unsupported(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // gRPC calls need a gRPC cluster; none exist in this host, which Envoy reports as a bad
    // cluster (BadArgument), a status the SDK turns into an `Err`.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: Ctx<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> wasmtime::Result<i32> { Ok(status::BAD_ARGUMENT) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: Ctx<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> wasmtime::Result<i32> { Ok(status::BAD_ARGUMENT) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: Ctx<'_>, _: i32, _: i32, _: i32, _: i32| -> wasmtime::Result<i32> {
            Ok(status::NOT_FOUND)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |_: Ctx<'_>, _: i32| -> wasmtime::Result<i32> { Ok(status::NOT_FOUND) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |_: Ctx<'_>, _: i32| -> wasmtime::Result<i32> { Ok(status::NOT_FOUND) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: Ctx<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> wasmtime::Result<i32> {
            Ok(status::NOT_FOUND)
        },
    )?;
    Ok(())
}

// === WASI preview1 ===

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_INVAL: i32 = 28;

fn add_wasi(linker: &mut Linker<HostState>, module: &str) -> wasmtime::Result<()> {
    linker.func_wrap(
        module,
        "fd_write",
        |mut caller: Ctx<'_>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         written_ptr: i32|
         -> wasmtime::Result<i32> {
            if fd != 1 && fd != 2 {
                return Ok(ERRNO_BADF);
            }
            let vectors = read(&caller, iovs, iovs_len.saturating_mul(8))?;
            let mut text = Vec::new();
            for iov in vectors.chunks_exact(8) {
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                text.extend(read(&caller, ptr, len)?);
            }
            let message = String::from_utf8_lossy(&text);
            let message = message.trim_end();
            let plugin = &caller.data().plugin.name;
            if fd == 1 {
                tracing::info!(target: "wasm", plugin, "{message}");
            } else {
                tracing::error!(target: "wasm", plugin, "{message}");
            }
            write_u32(&mut caller, written_ptr, text.len() as u32)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    for (sizes, values) in [
        ("environ_sizes_get", "environ_get"),
        ("args_sizes_get", "args_get"),
    ] {
        linker.func_wrap(
            module,
            sizes,
            |mut caller: Ctx<'_>, count_ptr: i32, size_ptr: i32| -> wasmtime::Result<i32> {
                write_u32(&mut caller, count_ptr, 0)?;
                write_u32(&mut caller, size_ptr, 0)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(
            module,
            values,
            |_: Ctx<'_>, _: i32, _: i32| -> wasmtime::Result<i32> { Ok(ERRNO_SUCCESS) },
        )?;
    }
    linker.func_wrap(
        module,
        "clock_time_get",
        |mut caller: Ctx<'_>, clock: i32, _precision: i64, ret: i32| -> wasmtime::Result<i32> {
            let nanos = match clock {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                1 => monotonic_nanos(),
                _ => return Ok(ERRNO_INVAL),
            };
            write(&mut caller, ret, &nanos.to_le_bytes())?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        module,
        "clock_res_get",
        |mut caller: Ctx<'_>, _clock: i32, ret: i32| -> wasmtime::Result<i32> {
            write(&mut caller, ret, &1u64.to_le_bytes())?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        module,
        "random_get",
        |mut caller: Ctx<'_>, buf: i32, len: i32| -> wasmtime::Result<i32> {
            let mut bytes = vec![0u8; len as u32 as usize];
            getrandom::getrandom(&mut bytes).map_err(|e| format_err!("random_get: {e}"))?;
            write(&mut caller, buf, &bytes)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        module,
        "proc_exit",
        |_: Ctx<'_>, code: i32| -> wasmtime::Result<()> {
            bail!("the module called proc_exit({code})")
        },
    )?;
    Ok(())
}

fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
