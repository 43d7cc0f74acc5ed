//! Host functions: buffers.

use wasmtime::Linker;

use super::Ctx;
use super::memory::{copy_out, write_u32};
use crate::abi::{BufferType, status};
use crate::state::{HostState, Phase};

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

pub(super) fn add_buffers(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
