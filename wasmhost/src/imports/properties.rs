//! Host functions: properties.

use wasmtime::Linker;

use super::Ctx;
use super::memory::{copy_out, read};
use crate::abi::status;
use crate::state::HostState;

pub(super) fn add_properties(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
