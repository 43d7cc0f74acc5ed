//! The `azgate` binary: parses the command line, sets up logging and the runtime, and hands
//! the subcommand to its module in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cli::{gateway, pki, token_service, workstation};

/// azgate: short-lived, role-checked Azure access.
#[derive(Parser, Debug)]
#[command(name = "azgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve managed-identity tokens over the IMDS protocol
    /// (`GET /metadata/identity/oauth2/token`, `Metadata: true`) and, with
    /// --app-service-header-file, the App Service protocol (`GET /msi/token`), cached with
    /// refresh-ahead and single-flight; `/metrics` has Prometheus counters.
    TokenService(Box<token_service::TokenServiceArgs>),
    /// Run the filter inside wasmtime as an mTLS gateway in front of Azure
    /// (see README: `azgate.yaml`). Stops on SIGTERM/SIGINT after draining.
    Serve(gateway::ServeArgs),
    /// Render the production Envoy configuration from the `azgate.yaml` that `azgate serve`
    /// reads (mTLS, XFCC SANITIZE_SET, the filter fail-closed, a dynamic forward proxy to Azure,
    /// token clusters to `azgate token-service`, JSON access log, connection limits).
    EnvoyConfig(gateway::EnvoyConfigArgs),
    /// Compile the filter into a compiled-code cache (`filter.cache_dir`) and exit; `azgate
    /// serve` then loads it from there. Serve runs this itself at every start.
    CompileFilter(gateway::CompileFilterArgs),
    /// Dev CA for Teleport-format app certificates: `init`, `issue`, `server`.
    #[command(subcommand)]
    Ca(pki::CaCommand),
    /// List what an app certificate allows: user, roles, selected and allowed Azure identities.
    Identities(pki::IdentitiesArgs),
    /// Local proxies for clients on the workstation (`proxy azure`, like `tsh proxy azure`).
    #[command(subcommand)]
    Proxy(workstation::ProxyCommand),
    /// Run `az` through the gateway (like `tsh az`), logging in with the certificate's identity
    /// when needed. Exits with az's exit code.
    Az(Box<workstation::AzArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `azgate az` shares the terminal with az: only warnings unless asked for more.
    let default_level = match cli.command {
        Command::Az(_) => "warn",
        _ => "info",
    };
    // Log lines (audit lines among them) are batched and written by a background thread, so
    // request paths neither wait on stderr nor wake a thread per line; never lossy (a full
    // buffer holds producers back). The guard writes what is left when main returns.
    let (writer, _flush_on_exit) = match azgate::log_sink::batched(std::io::stderr()) {
        Ok(sink) => sink,
        Err(error) => {
            eprintln!("azgate: cannot start the log writer: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("AZGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(azgate::log_line::LineFormat)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(None) => ExitCode::SUCCESS,
        // `azgate az` ends with az's own exit code.
        Ok(Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            tracing::error!(%error, "azgate failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; `Some(code)` is the exit code of a program it ran (`azgate az`).
async fn run(command: Command) -> cli::CliResult<Option<i32>> {
    match command {
        Command::TokenService(args) => token_service::run(*args).await?,
        Command::Serve(args) => gateway::serve(args).await?,
        Command::EnvoyConfig(args) => gateway::envoy_config(args)?,
        Command::CompileFilter(args) => gateway::compile_filter(args)?,
        Command::Ca(command) => pki::ca(command)?,
        Command::Identities(args) => pki::identities(args)?,
        Command::Proxy(workstation::ProxyCommand::Azure(args)) => {
            workstation::proxy_azure(args).await?;
        }
        Command::Az(args) => return workstation::run_az(*args).await.map(Some),
    }
    Ok(None)
}
