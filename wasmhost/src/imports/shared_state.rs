//! Host functions: shared data, queues, metrics.

use wasmtime::Linker;

use super::Ctx;
use super::memory::{copy_out, read, read_string, write, write_u32};
use crate::abi::status;
use crate::shared::{MetricError, MetricKind, SetOutcome};
use crate::state::HostState;

pub(super) fn add_shared_state(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
