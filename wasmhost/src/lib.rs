//! A proxy-wasm ABI 0.2.1/0.2.0 host for HTTP filters on wasmtime, following Envoy's host
//! semantics (see `shared/reference/proxy-wasm-abi.md`).
//!
//! A [`Plugin`] is compiled once (compiled code optionally cached on disk) with one `Linker`;
//! each worker thread starts its own [`Vm`] (one `Store`). The host is synchronous: a callback
//! runs, and what it asked for — continue or answer a stream, start a call-out, change the
//! tick — comes back as [`Effects`] for the embedding proxy to carry out afterwards, the way
//! Envoy defers those actions until the VM call returns.

#![warn(missing_docs, unreachable_pub)]

mod abi;
mod error;
mod imports;
mod plugin;
mod properties;
mod shared;
mod state;

pub use abi::{Action, deserialize_pairs, serialize_pairs};
pub use error::HostError;
pub use plugin::{Plugin, PluginOptions, SharedStores, Vm};
pub use shared::{
    MetricError, MetricKind, MetricSample, Metrics, QueueReady, SetOutcome, SharedData,
    SharedQueues,
};
pub use state::{
    CallResponse, Effects, HeaderList, HttpCall, LocalResponse, Stream, StreamAction, StreamInfo,
};
