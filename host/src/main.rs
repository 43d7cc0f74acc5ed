//! The `azgate` binary.

mod cli_workstation;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use azgate::token::{
    BuiltTokenService, HyperClient, ManagedIdentity, Secret, SecretSource, SourceKind, TokenError,
    TokenSettings,
};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    TokenService(Box<TokenServiceArgs>),
    /// Run the filter inside wasmtime as an mTLS gateway in front of Azure
    /// (see README: `azgate.yaml`). Stops on SIGTERM/SIGINT after draining.
    Serve {
        /// The gateway configuration file.
        #[arg(long, default_value = "azgate.yaml")]
        config: PathBuf,
    },
    /// Render the production Envoy configuration from the `azgate.yaml` that `azgate serve`
    /// reads (mTLS, XFCC SANITIZE_SET, the filter fail-closed, a dynamic forward proxy to Azure,
    /// token clusters to `azgate token-service`, JSON access log, connection limits).
    EnvoyConfig {
        /// The gateway configuration file.
        #[arg(long, default_value = "azgate.yaml")]
        config: PathBuf,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Where `azgate token-service` listens, for `token_service: true` clusters: HOST:PORT or
        /// `unix:/path`.
        #[arg(long, default_value = azgate::envoy_config::DEFAULT_TOKEN_SERVICE_ADDRESS)]
        token_service_address: azgate::token::ListenAddress,
        /// System CA bundle for TLS to Azure (default: the first that exists of the usual
        /// Linux locations).
        #[arg(long)]
        system_ca_file: Option<PathBuf>,
        /// Keep running: re-render the filter's configuration when the role or lock files
        /// change, so Envoy applies the new policy live (needs --output and policy files).
        #[arg(long)]
        watch: bool,
    },
    /// Dev CA for Teleport-format app certificates: `init`, `issue`, `server`.
    #[command(subcommand)]
    Ca(cli_workstation::CaCommand),
    /// List what an app certificate allows: user, roles, selected and allowed Azure identities.
    Identities(cli_workstation::IdentitiesArgs),
    /// Local proxies for clients on the workstation (`proxy azure`, like `tsh proxy azure`).
    #[command(subcommand)]
    Proxy(cli_workstation::ProxyCommand),
    /// Run `az` through the gateway (like `tsh az`), logging in with the certificate's identity
    /// when needed. Exits with az's exit code.
    Az(Box<cli_workstation::AzArgs>),
}

/// `azgate token-service`: each flag is the `token_source:` setting of the same name in
/// `azgate.yaml` (`--client-id` is `client_id`, …); see `azgate::token::TokenSettings`.
#[derive(Args, Debug)]
#[command(after_help = "\
App Service protocol: with --app-service-header-file PATH (or the secret in the environment \
variable AZGATE_IDENTITY_HEADER) the service also answers \
GET /msi/token?api-version=2019-08-01&resource=... to callers sending that secret as \
X-IDENTITY-HEADER: point App Service clients at it with IDENTITY_ENDPOINT=http://ADDR/msi/token \
and IDENTITY_HEADER=<the secret>. Without a secret /msi/token answers 404.

Both protocols take token_sha256_to_refresh=<hex SHA-256 of a token> (continuous access \
evaluation): when it is the cached token's hash, that token is dropped and a new one fetched.")]
struct TokenServiceArgs {
    /// Where to listen: HOST:PORT (loopback; port 0 picks a free port, printed) or
    /// `unix:/path` (a socket with mode 0660: only its owner and group may ask for tokens).
    #[arg(long)]
    listen: azgate::token::ListenAddress,
    /// Where tokens come from; `auto` detects it from the environment in the Azure SDKs' order.
    #[arg(long, value_enum, default_value_t = SourceKind::Auto)]
    source: SourceKind,
    /// IMDS scheme and host.
    #[arg(long, env = "AZURE_POD_IDENTITY_AUTHORITY_HOST")]
    imds_endpoint: Option<String>,
    /// App Service source: its token URL.
    #[arg(long, env = "IDENTITY_ENDPOINT")]
    identity_endpoint: Option<String>,
    /// App Service source: the `X-IDENTITY-HEADER` value to send it (prefer the environment
    /// variable or --identity-header-file: a flag's value shows in `ps`).
    #[arg(long, env = "IDENTITY_HEADER", hide_env_values = true)]
    identity_header: Option<Secret>,
    /// App Service source: a file holding the `X-IDENTITY-HEADER` value to send it.
    #[arg(long, conflicts_with = "identity_header")]
    identity_header_file: Option<PathBuf>,
    /// Entra authority host for workload identity and service principals.
    #[arg(long, env = "AZURE_AUTHORITY_HOST")]
    authority_host: Option<String>,
    /// Tenant of the workload identity or service principal.
    #[arg(long, env = "AZURE_TENANT_ID")]
    tenant_id: Option<String>,
    /// Client id of the workload identity (default identity) or service principal.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    client_id: Option<String>,
    /// Service principal secret (prefer the environment variable or --client-secret-file).
    #[arg(long, env = "AZURE_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<Secret>,
    /// A file holding the service principal secret.
    #[arg(long, conflicts_with = "client_secret")]
    client_secret_file: Option<PathBuf>,
    /// PEM file with the service principal's RSA key and certificate.
    #[arg(long, env = "AZURE_CLIENT_CERTIFICATE_PATH")]
    client_certificate_path: Option<PathBuf>,
    /// Projected service-account token of AKS workload identity.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    federated_token_file: Option<PathBuf>,
    /// Serve only these identities (repeatable): `system`, `client_id=ID`, `object_id=ID` or
    /// `msi_res_id=ARM_ID`. Default: every identity. Applies to both protocols.
    #[arg(long = "allow-identity", value_name = "IDENTITY")]
    allowed_identities: Vec<ManagedIdentity>,
    /// Ask the source for `msi_res_id=ARM_ID` as `client_id=CLIENT_ID` (repeatable): workload
    /// identity selects identities by client id, the filter names them by resource id.
    #[arg(long = "identity-client-id", value_name = "ARM_ID=CLIENT_ID", value_parser = resource_client_id)]
    identity_client_ids: Vec<(String, String)>,
    /// Per-request deadline in milliseconds; the fetch continues after it.
    #[arg(long, default_value_t = 5000)]
    deadline_ms: u64,
    /// Upstream requests in flight at once.
    #[arg(long, default_value_t = 5)]
    max_concurrent_requests: usize,
    /// Upstream requests started per second.
    #[arg(long, default_value_t = 20)]
    max_requests_per_second: u32,
    /// Cached (identity, resource) keys.
    #[arg(long, default_value_t = 1024)]
    max_entries: usize,
    /// Also serve the App Service protocol (`GET /msi/token`) to callers whose
    /// `X-IDENTITY-HEADER` equals the contents of this file (read once at start). The
    /// environment variable AZGATE_IDENTITY_HEADER may hold the secret instead.
    #[arg(long, value_name = "PATH")]
    app_service_header_file: Option<PathBuf>,
}

impl TokenServiceArgs {
    /// The shared settings these flags stand for (what `token_source:` holds in azgate.yaml).
    fn settings(&self) -> TokenSettings {
        TokenSettings {
            source: self.source,
            imds_endpoint: self.imds_endpoint.clone(),
            identity_endpoint: self.identity_endpoint.clone(),
            identity_header: self.identity_header.clone().map(SecretSource::Value),
            identity_header_file: self.identity_header_file.clone(),
            identity_header_env: None,
            authority_host: self.authority_host.clone(),
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone().map(SecretSource::Value),
            client_secret_file: self.client_secret_file.clone(),
            client_secret_env: None,
            client_certificate_path: self.client_certificate_path.clone(),
            federated_token_file: self.federated_token_file.clone(),
            allow_identities: self.allowed_identities.clone(),
            identity_client_ids: self.identity_client_ids.iter().cloned().collect(),
            deadline_ms: Some(self.deadline_ms),
            max_concurrent_requests: Some(self.max_concurrent_requests),
            max_requests_per_second: Some(self.max_requests_per_second),
            max_entries: Some(self.max_entries),
            app_service_header: None,
            app_service_header_file: self.app_service_header_file.clone(),
            app_service_header_env: None,
        }
    }
}

/// The exit code of the `az` that `azgate az` ran, returned from `main` (so the log guard still
/// flushes).
static AZ_EXIT_CODE: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `azgate az` shares the terminal with az: only warnings unless asked for more.
    let default_level = match cli.command {
        Command::Az(_) => "warn",
        _ => "info",
    };
    // Log lines are written by a background thread, so request paths do not wait on (or share a
    // lock over) stderr; not lossy, because audit lines must never be dropped (a full buffer
    // applies back-pressure instead). The guard flushes what is left when main returns.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // Buffered: the writer thread flushes whenever its queue runs dry, so a burst of
        // lines costs one write instead of one per line, and nothing waits longer than that.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("AZGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        // `azgate az` ends with az's own exit code.
        Ok(()) => AZ_EXIT_CODE.get().map_or(ExitCode::SUCCESS, |code| {
            ExitCode::from(u8::try_from(*code).unwrap_or(1))
        }),
        Err(error) => {
            tracing::error!(%error, "azgate failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Ca(command) => cli_workstation::ca(command),
        Command::Identities(args) => cli_workstation::identities(args),
        Command::Proxy(cli_workstation::ProxyCommand::Azure(args)) => {
            cli_workstation::proxy_azure(args).await
        }
        Command::Az(args) => {
            let code = cli_workstation::run_az(*args).await?;
            let _ = AZ_EXIT_CODE.set(code);
            Ok(())
        }
        Command::Serve { config } => {
            let config = azgate::config::ServeConfig::load(&config)
                .map_err(|e| format!("invalid configuration: {e}"))?;
            azgate::serve::run(config).await?;
            Ok(())
        }
        Command::EnvoyConfig {
            config: path,
            output,
            token_service_address,
            system_ca_file,
            watch,
        } => {
            let config = azgate::config::ServeConfig::load(&path)
                .map_err(|e| format!("invalid configuration: {e}"))?;
            // With policy files and a file to write, the filter's configuration goes to a
            // resource Envoy watches (ECDS), so policy changes apply without a restart.
            let filter_resource = match &output {
                Some(file) if !config.policy_sources().is_empty() => Some(
                    std::path::absolute(file.with_extension("filter.yaml"))
                        .map_err(|e| format!("{}: {e}", file.display()))?,
                ),
                _ => None,
            };
            if watch && filter_resource.is_none() {
                return Err(
                    "--watch needs --output and filter.role_files or filter.lock_files".into(),
                );
            }
            let options = azgate::envoy_config::RenderOptions {
                token_service_address,
                system_ca_file,
                source: path,
                filter_resource: filter_resource.clone(),
            };
            let text = azgate::envoy_config::render(&config, &options)
                .map_err(|e| format!("cannot render: {e}"))?;
            let mut policy = Vec::new();
            if let Some(resource_path) = &filter_resource {
                policy = config
                    .plugin_config()
                    .map_err(|e| format!("cannot render: {e}"))?;
                let resource = azgate::envoy_config::render_filter_resource(&config, &policy)
                    .map_err(|e| format!("cannot render: {e}"))?;
                replace_file(resource_path, &resource)?;
            }
            match &output {
                Some(file) => replace_file(file, &text)?,
                None => print!("{text}"),
            }
            if let (true, Some(resource_path)) = (watch, filter_resource) {
                watch_policy(&config, &resource_path, policy);
            }
            Ok(())
        }
        Command::TokenService(args) => {
            let built = token_service_parts(&args)?;
            tracing::info!(
                source = built.source.kind(),
                app_service = built.app_service_header.is_some(),
                "token source"
            );
            let service = built.into_service(Arc::new(HyperClient::new()?));
            if let azgate::token::ListenAddress::Tcp(addr) = &args.listen
                && !addr.ip().is_loopback()
            {
                // Anyone who can reach this port gets tokens for every allowed identity.
                tracing::warn!(listen = %args.listen, "token service listening on a non-loopback address");
            }
            let running = service.start_on(&args.listen).await?;
            println!("listening on {}", running.local_addr());
            tracing::info!(addr = %running.local_addr(), "token service serving");
            shutdown_signal().await;
            running.shutdown();
            Ok(())
        }
    }
}

/// `ARM_ID=CLIENT_ID` (the ARM id contains no `=`).
fn resource_client_id(text: &str) -> Result<(String, String), String> {
    match text.rsplit_once('=') {
        Some((resource_id, client_id)) if resource_id.starts_with('/') && !client_id.is_empty() => {
            Ok((resource_id.to_owned(), client_id.to_owned()))
        }
        _ => Err(format!("expected /subscriptions/…=CLIENT_ID, got {text:?}")),
    }
}

/// The source (configured, or detected for `--source auto`), limits, allow-list and App
/// Service secret of `azgate token-service`, through the settings `azgate serve` shares. Flags
/// fall back to the standard Azure environment variables (clap's `env`, then the settings').
fn token_service_parts(args: &TokenServiceArgs) -> Result<BuiltTokenService, TokenError> {
    args.settings().build_from_environment()
}

pub(crate) use azgate_msi::server::shutdown_signal;

/// Writes `path` by a rename from a temporary file beside it, so a reader (Envoy watching the
/// directory) never sees half a file.
fn replace_file(path: &std::path::Path, text: &str) -> Result<(), String> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `envoy-config --watch`: looks at the policy files as `azgate serve` does
/// ([`PolicyWatch`]) and moves the filter resource of a changed policy into place; a refused
/// or unreadable policy keeps the resource in force (and is logged once).
fn watch_policy(
    config: &azgate::config::ServeConfig,
    resource_path: &std::path::Path,
    current: Vec<u8>,
) {
    use azgate::config::policy::{POLL_INTERVAL, PolicyChange, PolicyWatch};
    tracing::info!(resource = %resource_path.display(), "watching the policy files");
    let mut policy = PolicyWatch::new(current);
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let PolicyChange::Changed(candidate) = policy.poll(config) else {
            continue;
        };
        let written = azgate::envoy_config::render_filter_resource(config, &candidate)
            .map_err(|e| e.to_string())
            .and_then(|text| replace_file(resource_path, &text));
        match written {
            Ok(()) => {
                policy.accept(candidate);
                tracing::info!("policy files changed: the new filter configuration is written");
            }
            // Not accepted, so the next look tries again.
            Err(error) => tracing::error!(%error, "could not write the filter resource"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use azgate::token::Source;

    fn token_service_args(args: &[&str]) -> TokenServiceArgs {
        let cli = Cli::try_parse_from(
            ["azgate", "token-service", "--listen", "127.0.0.1:0"]
                .iter()
                .chain(args),
        )
        .unwrap();
        match cli.command {
            Command::TokenService(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_sources_take_their_flags() {
        let args =
            token_service_args(&["--source", "imds", "--imds-endpoint", "http://127.0.0.1:1"]);
        assert!(
            matches!(token_service_parts(&args).map(|built| built.source).unwrap(), Source::Imds { endpoint } if endpoint == "http://127.0.0.1:1")
        );

        let args = token_service_args(&[
            "--source",
            "client-secret",
            "--tenant-id",
            "t",
            "--client-id",
            "c",
            "--client-secret",
            "s",
        ]);
        let source = token_service_parts(&args)
            .map(|built| built.source)
            .unwrap();
        assert_eq!(source.kind(), "client_secret");
        assert!(
            !format!("{args:?}{source:?}").contains("\"s\""),
            "secrets stay out of Debug"
        );

        let args = token_service_args(&["--source", "workload-identity", "--tenant-id", "t"]);
        assert!(matches!(
            token_service_parts(&args).map(|built| built.source),
            Err(TokenError::Configuration(_))
        ));
    }

    #[test]
    fn allow_list_entries_parse_as_identities() {
        let args = token_service_args(&[
            "--allow-identity",
            "system",
            "--allow-identity",
            "msi_res_id=/subscriptions/s/x",
        ]);
        assert_eq!(
            args.allowed_identities,
            [
                ManagedIdentity::SystemAssigned,
                ManagedIdentity::ResourceId("/subscriptions/s/x".into())
            ]
        );
        assert!(
            Cli::try_parse_from([
                "azgate",
                "token-service",
                "--listen",
                "127.0.0.1:0",
                "--allow-identity",
                "bogus"
            ])
            .is_err()
        );
    }
}
