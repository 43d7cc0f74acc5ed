//! The host functions a proxy-wasm 0.2.x module imports (`env.proxy_*` and the WASI preview1
//! calls a `wasm32-wasip1` module needs), with Envoy's semantics.
//!
//! One module per ABI area, registered here on the one `Linker`. Guest memory is only touched
//! through `memory` (`read`, `write`, `copy_out`), which checks every pointer and length: a miss is a trap (an `Err`), never a panic and never status 6, which the
//! Rust SDK does not know.

mod buffers;
mod header_maps;
mod http_calls;
mod lifecycle;
mod memory;
mod properties;
mod shared_state;
mod stream_control;
mod unsupported;
mod wasi;

use wasmtime::{Caller, Linker};

use crate::state::HostState;

type Ctx<'a> = Caller<'a, HostState>;

/// Registers every host function on `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    lifecycle::add_logging_and_time(linker)?;
    buffers::add_buffers(linker)?;
    header_maps::add_header_maps(linker)?;
    stream_control::add_stream_control(linker)?;
    http_calls::add_http_calls(linker)?;
    shared_state::add_shared_state(linker)?;
    properties::add_properties(linker)?;
    unsupported::add_unsupported(linker)?;
    wasi::add_wasi(linker, "wasi_snapshot_preview1")?;
    wasi::add_wasi(linker, "wasi_unstable")?;
    Ok(())
}
