//! Host functions: not supported: gRPC, foreign functions.

use wasmtime::Linker;

use super::Ctx;
use crate::abi::status;
use crate::state::HostState;

pub(super) fn add_unsupported(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
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
