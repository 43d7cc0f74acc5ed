//! Host functions: WASI preview1.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Linker, bail, format_err};

use super::Ctx;
use super::memory::{read, write, write_u32};
use crate::state::HostState;

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_INVAL: i32 = 28;

pub(super) fn add_wasi(linker: &mut Linker<HostState>, module: &str) -> wasmtime::Result<()> {
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
