//! `azgate serve` and `azgate envoy-config`: the gateway, and the Envoy configuration rendered
//! from the same `azgate.yaml`.

use std::path::PathBuf;

use azgate::config::ServeConfig;
use clap::Args;

use super::CliResult;

/// Run the filter inside wasmtime as an mTLS gateway in front of Azure
/// (see README: `azgate.yaml`). Stops on SIGTERM/SIGINT after draining.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// The gateway configuration file.
    #[arg(long, default_value = "azgate.yaml")]
    pub(crate) config: PathBuf,
}

/// Render the production Envoy configuration from the `azgate.yaml` that `azgate serve`
/// reads (mTLS, XFCC SANITIZE_SET, the filter fail-closed, a dynamic forward proxy to Azure,
/// token clusters to `azgate token-service`, JSON access log, connection limits).
#[derive(Args, Debug)]
pub(crate) struct EnvoyConfigArgs {
    /// The gateway configuration file.
    #[arg(long, default_value = "azgate.yaml")]
    pub(crate) config: PathBuf,
    /// Write here instead of standard output.
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
    /// Where `azgate token-service` listens, for `token_service: true` clusters: HOST:PORT or
    /// `unix:/path`.
    #[arg(long, default_value = azgate::envoy_config::DEFAULT_TOKEN_SERVICE_ADDRESS)]
    pub(crate) token_service_address: azgate::token::ListenAddress,
    /// System CA bundle for TLS to Azure (default: the first that exists of the usual
    /// Linux locations).
    #[arg(long)]
    pub(crate) system_ca_file: Option<PathBuf>,
    /// Keep running: re-render the filter's configuration when the role or lock files
    /// change, so Envoy applies the new policy live (needs --output and policy files).
    #[arg(long)]
    pub(crate) watch: bool,
}

/// Compile the filter into a compiled-code cache and exit.
#[derive(Args, Debug)]
pub(crate) struct CompileFilterArgs {
    /// The filter module (`-`: standard input).
    #[arg(long)]
    pub(crate) wasm: PathBuf,
    /// The cache directory (`filter.cache_dir` of `azgate.yaml`).
    #[arg(long)]
    pub(crate) cache_dir: PathBuf,
}

/// Compiles the module into the cache; a cached module is left as it is.
pub(crate) fn compile_filter(args: CompileFilterArgs) -> CliResult<()> {
    let started = std::time::Instant::now();
    let wasm = if args.wasm.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .map_err(|e| format!("standard input: {e}"))?;
        bytes
    } else {
        std::fs::read(&args.wasm).map_err(|e| format!("{}: {e}", args.wasm.display()))?
    };
    azgate_wasmhost::Plugin::compile_into_cache(&wasm, &args.cache_dir)?;
    tracing::info!(
        cache_dir = %args.cache_dir.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "filter compiled into the cache"
    );
    Ok(())
}

/// Runs the gateway until SIGINT/SIGTERM (then drains).
pub(crate) async fn serve(args: ServeArgs) -> CliResult<()> {
    let config =
        ServeConfig::load(&args.config).map_err(|e| format!("invalid configuration: {e}"))?;
    azgate::serve::run(config).await?;
    Ok(())
}

/// Renders (and with `--watch` keeps rendering) the Envoy configuration.
pub(crate) fn envoy_config(args: EnvoyConfigArgs) -> CliResult<()> {
    let EnvoyConfigArgs {
        config: path,
        output,
        token_service_address,
        system_ca_file,
        watch,
    } = args;
    let config = ServeConfig::load(&path).map_err(|e| format!("invalid configuration: {e}"))?;
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
        return Err("--watch needs --output and filter.role_files or filter.lock_files".into());
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
fn watch_policy(config: &ServeConfig, resource_path: &std::path::Path, current: Vec<u8>) {
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
