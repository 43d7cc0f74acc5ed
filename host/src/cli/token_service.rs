//! `azgate token-service`: managed-identity tokens over the IMDS (and App Service) protocol.

use std::path::PathBuf;
use std::sync::Arc;

use azgate::token::{
    BuiltTokenService, HyperClient, ManagedIdentity, Secret, SecretSource, SourceKind, TokenError,
    TokenSettings,
};
use clap::Parser;

use super::CliResult;

/// `azgate token-service`: each flag is the `token_source:` setting of the same name in
/// `azgate.yaml` (`--client-id` is `client_id`, …); see `azgate::token::TokenSettings`.
#[derive(Parser, Debug)]
#[command(after_help = "\
App Service protocol: with --app-service-header-file PATH (or the secret in the environment \
variable AZGATE_IDENTITY_HEADER) the service also answers \
GET /msi/token?api-version=2019-08-01&resource=... to callers sending that secret as \
X-IDENTITY-HEADER: point App Service clients at it with IDENTITY_ENDPOINT=http://ADDR/msi/token \
and IDENTITY_HEADER=<the secret>. Without a secret /msi/token answers 404.

Both protocols take token_sha256_to_refresh=<hex SHA-256 of a token> (continuous access \
evaluation): when it is the cached token's hash, that token is dropped and a new one fetched.")]
pub(crate) struct TokenServiceArgs {
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

/// Serves tokens until SIGINT/SIGTERM.
pub(crate) async fn run(args: TokenServiceArgs) -> CliResult<()> {
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
    azgate_msi::server::shutdown_signal().await;
    running.shutdown();
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use azgate::token::Source;

    fn try_parse(args: &[&str]) -> Result<TokenServiceArgs, clap::Error> {
        TokenServiceArgs::try_parse_from(
            ["token-service", "--listen", "127.0.0.1:0"]
                .iter()
                .chain(args),
        )
    }

    fn token_service_args(args: &[&str]) -> TokenServiceArgs {
        try_parse(args).unwrap()
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
        assert!(try_parse(&["--allow-identity", "bogus"]).is_err());
    }
}
