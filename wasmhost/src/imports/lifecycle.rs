//! Host functions: logging, time, ticks, done, effective context.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::Linker;

use super::Ctx;
use super::memory::{read_string, write, write_u32};
use crate::abi::{self, status};
use crate::state::HostState;

pub(super) fn add_logging_and_time(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
