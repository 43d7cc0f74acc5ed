//! The subcommands of the `azgate` binary, one module per family; each calls one product
//! module of the `azgate` library.

pub(crate) mod gateway;
pub(crate) mod pki;
pub(crate) mod token_service;
pub(crate) mod workstation;

/// What a subcommand returns: its error is logged and the exit code is 1.
pub(crate) type CliResult<T> = Result<T, Box<dyn std::error::Error>>;
