//! The host's one error type.

use std::fmt;

/// Why a plugin or VM could not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostError {
    /// The module did not compile, or the host functions could not be linked.
    Compile(String),
    /// `proxy_on_configure` returned false: the plugin refused its configuration.
    ConfigureRejected,
    /// The VM trapped earlier and must be replaced; the message is the original trap.
    Failed(String),
    /// Instantiation failed (missing exports, start function trapped).
    Instantiate(String),
    /// A callback trapped (a Rust panic is an `unreachable` trap); the VM is now failed.
    Trap(String),
    /// The module exports neither `proxy_abi_version_0_2_1` nor `proxy_abi_version_0_2_0`.
    UnsupportedAbi,
    /// `proxy_on_vm_start` returned false.
    VmStartRejected,
}

impl HostError {
    /// The status of the answer a request gets when its filter fails: always 503 (fail
    /// closed), as Envoy's `FAIL_CLOSED` policy answers.
    pub fn status(&self) -> u16 {
        503
    }

    /// The Azure-style error code of that answer.
    pub fn code(&self) -> &'static str {
        "FilterFailed"
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Compile(e) => write!(f, "the filter module could not be compiled: {e}"),
            Self::ConfigureRejected => write!(
                f,
                "the filter refused its configuration (proxy_on_configure returned false)"
            ),
            Self::Failed(e) => write!(f, "the filter VM failed earlier: {e}"),
            Self::Instantiate(e) => write!(f, "the filter module could not be instantiated: {e}"),
            Self::Trap(e) => write!(f, "the filter trapped: {e}"),
            Self::UnsupportedAbi => {
                write!(f, "the module declares no proxy-wasm ABI 0.2.0 or 0.2.1")
            }
            Self::VmStartRejected => write!(
                f,
                "the filter refused to start (proxy_on_vm_start returned false)"
            ),
        }
    }
}

impl std::error::Error for HostError {}
