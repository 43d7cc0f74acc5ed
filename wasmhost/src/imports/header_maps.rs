//! Host functions: header maps.

use wasmtime::Linker;

use super::Ctx;
use super::memory::{copy_out, read, read_string, write_u32};
use crate::abi::{self, MapType, status};
use crate::state::{HeaderList, HostState};

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

pub(super) fn add_header_maps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
