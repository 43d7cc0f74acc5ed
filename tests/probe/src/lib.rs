//! The ABI probe filter: a proxy-wasm HTTP filter for tests only. Each request names a scenario
//! in its `x-probe` header; the probe makes that scenario's host calls and answers with a local
//! response whose JSON body is what it observed (statuses, values, orders). Observations made
//! after a response (stream end callbacks, ticks, queue deliveries) go to shared data and are
//! read back by a later request. `tests/tests/probe.rs` runs every scenario on Envoy and on
//! `azgate serve` and compares the answers.
//!
//! The probe records raw facts and never decides pass or fail itself.

#[cfg(target_arch = "wasm32")]
mod probe;
#[cfg(target_arch = "wasm32")]
mod raw;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    probe::register();
}}
