//! `azgate proxy azure` and `azgate az`: the workstation side, like `tsh proxy azure` and
//! `tsh az`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use azgate::pki::{self, AppKey, PkiError};
use azgate::workstation::az::{self, StateDir};
use azgate::workstation::proxy::DEFAULT_LISTEN;
use azgate::workstation::{EndpointSecret, LocalProxy, ProxyConfig};
use clap::{Args, Subcommand};

use super::CliResult;
use super::pki::read;

/// `azgate proxy ...`
#[derive(Subcommand, Debug)]
pub(crate) enum ProxyCommand {
    /// Run the local proxy for `az` (like `tsh proxy azure`) and print the variables to export.
    Azure(ConnectArgs),
}

/// How to reach the gateway, shared by `proxy azure` and `az`.
#[derive(Args, Debug)]
pub(crate) struct ConnectArgs {
    /// The gateway, HOST:PORT.
    #[arg(long, env = "AZGATE_GATEWAY")]
    gateway: String,
    /// The app certificate (PEM), presented to the gateway.
    #[arg(long, env = "AZGATE_CERT")]
    cert: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "AZGATE_KEY")]
    key: PathBuf,
    /// The CA certificate(s) that issued the gateway's server certificate (PEM).
    #[arg(long, env = "AZGATE_CA")]
    ca: PathBuf,
    /// Where the local proxy listens.
    #[arg(long, default_value_t = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// AZURE_CONFIG_DIR for az [default: $AZGATE_HOME/azure/<identity>-<hash>].
    #[arg(long)]
    azure_config_dir: Option<PathBuf>,
}

/// `azgate az` flags.
#[derive(Args, Debug)]
pub(crate) struct AzArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The az executable.
    #[arg(long, env = "AZGATE_AZ", default_value = "az")]
    az_binary: OsString,
    /// Do not run `az login --identity` first, even when az is not logged in.
    #[arg(long)]
    no_login: bool,
    /// The az command line.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    args: Vec<String>,
}

async fn start_proxy(
    args: &ConnectArgs,
) -> CliResult<(LocalProxy, StateDir, Vec<(&'static str, String)>)> {
    if !args.listen.ip().is_loopback() {
        // Whoever reaches the port can use the certificate's session (as with tsh's proxy).
        tracing::warn!(listen = %args.listen, "the local proxy listens on a non-loopback address");
    }
    let cert_pem = read(&args.cert, "--cert")?;
    let key = AppKey::from_pem(&read(&args.key, "--key")?)
        .map_err(|e| PkiError::Invalid(format!("--key {}: {e}", args.key.display())))?;
    let gateway_ca_pem = read(&args.ca, "--ca")?;
    // The user's own proxy carries the non-Azure traffic, as it would without azgate.
    let user_proxy = ["https_proxy", "HTTPS_PROXY"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    let no_proxy = ["no_proxy", "NO_PROXY"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    // A nested azgate (e.g. `azgate az` inside `azgate proxy azure`'s exports) keeps the secret.
    let secret = std::env::var("IDENTITY_HEADER")
        .ok()
        .and_then(|v| EndpointSecret::from_existing(&v))
        .unwrap_or_else(EndpointSecret::generate);
    let proxy = LocalProxy::start(ProxyConfig {
        gateway: args.gateway.clone(),
        cert_pem,
        key,
        gateway_ca_pem,
        listen: args.listen,
        upstream_proxy: user_proxy,
        no_proxy,
        secret,
    })
    .await?;
    let state = StateDir::create()?;
    let bundle = state.write_ca_bundle(proxy.local_ca_pem())?;
    let config_dir = match &args.azure_config_dir {
        Some(dir) => dir.clone(),
        None => az::default_config_dir(&args.gateway, proxy.identity())?,
    };
    pki::create_private_dir(&config_dir)?;
    let variables = az::environment(&proxy, &config_dir, &bundle);
    Ok((proxy, state, variables))
}

/// `azgate proxy azure`: serve until SIGINT/SIGTERM.
pub(crate) async fn proxy_azure(args: ConnectArgs) -> CliResult<()> {
    let (proxy, state, variables) = start_proxy(&args).await?;
    println!(
        "# azgate proxy for {} via {}",
        proxy.identity(),
        args.gateway
    );
    println!(
        "# Run these in the shell where you use az, then: az login --identity --resource-id {}",
        proxy.identity()
    );
    print!("{}", az::export_lines(&variables));
    tracing::info!(addr = %proxy.local_addr(), identity = proxy.identity(), "local proxy serving");
    azgate_msi::server::shutdown_signal().await;
    proxy.shutdown();
    drop(state);
    Ok(())
}

/// `azgate az ...`: the exit code of az.
pub(crate) async fn run_az(args: AzArgs) -> CliResult<i32> {
    let (proxy, state, variables) = start_proxy(&args.connect).await?;
    let config_dir = variables
        .iter()
        .find(|(name, _)| *name == "AZURE_CONFIG_DIR")
        .map(|(_, value)| PathBuf::from(value))
        .unwrap_or_default();
    if !args.no_login && !az::is_login(&args.args) && !az::logged_in(&config_dir, proxy.identity())
    {
        tracing::info!(
            identity = proxy.identity(),
            "az is not logged in as the identity: logging in"
        );
        az::login(&args.az_binary, &variables, proxy.identity()).await?;
    }
    let status = az::run(&args.az_binary, &variables, &args.args).await?;
    proxy.shutdown();
    drop(state);
    Ok(status.code().unwrap_or(1))
}
