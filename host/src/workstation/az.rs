//! The environment `az` runs with behind the local proxy, and `azgate az`'s login step.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use sha2::{Digest, Sha256};

use super::WorkstationError;
use super::proxy::LocalProxy;
use super::token_endpoint::{IDENTITY_HOST, MSI_HOST};
use crate::pki::{create_private_dir, write_file};

/// Variables removed from `az`'s environment: each would send `az` elsewhere (a user proxy
/// bypassing ours, another managed-identity source that MSAL prefers or that changes the
/// protocol).
pub const REMOVED_VARIABLES: &[&str] = &[
    "NO_PROXY",
    "no_proxy",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_SECRET",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
];

/// Where trusted roots of the system usually are; appended to the bundle so non-Azure hosts
/// that are tunnelled untouched still verify under `REQUESTS_CA_BUNDLE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A private per-process directory (mode 0700) for the CA bundle, removed on drop.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Creates `<tmp>/azgate-proxy-<pid>-<random>`.
    pub fn create() -> Result<Self, WorkstationError> {
        let path = std::env::temp_dir().join(format!(
            "azgate-proxy-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        create_private_dir(&path).map_err(|e| WorkstationError::Config(e.to_string()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the local CA (plus the system's roots, when found) as `ca-bundle.pem`.
    pub fn write_ca_bundle(&self, local_ca_pem: &str) -> Result<PathBuf, WorkstationError> {
        let mut bundle = local_ca_pem.to_owned();
        if let Some(system) = SYSTEM_BUNDLES
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
        {
            bundle.push('\n');
            bundle.push_str(&system);
        }
        let path = self.path.join("ca-bundle.pem");
        write_file(&path, &bundle, false).map_err(|e| WorkstationError::Config(e.to_string()))?;
        Ok(path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `$AZGATE_HOME`, else `~/.azgate`.
pub fn azgate_home() -> Result<PathBuf, WorkstationError> {
    if let Some(home) = std::env::var_os("AZGATE_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".azgate"))
        .ok_or_else(|| WorkstationError::Config("neither AZGATE_HOME nor HOME is set".into()))
}

/// The default `AZURE_CONFIG_DIR` for an identity behind a gateway:
/// `<azgate home>/azure/<identity name>-<8 hex digits of SHA-256(gateway, identity)>`, so `az`'s
/// login state for one identity never leaks into another's (as tsh keeps one per app).
pub fn default_config_dir(gateway: &str, identity: &str) -> Result<PathBuf, WorkstationError> {
    let name: String = identity
        .rsplit('/')
        .next()
        .unwrap_or("identity")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = Sha256::digest(format!("{gateway}\n{}", identity.to_ascii_lowercase()));
    let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    Ok(azgate_home()?.join("azure").join(format!("{name}-{short}")))
}

/// The variables `az` needs, in the order `azgate proxy azure` prints them.
pub fn environment(
    proxy: &LocalProxy,
    config_dir: &Path,
    ca_bundle: &Path,
) -> Vec<(&'static str, String)> {
    let proxy_url = format!("http://{}", proxy.local_addr());
    let secret = proxy.secret().expose();
    vec![
        ("AZURE_CONFIG_DIR", config_dir.display().to_string()),
        ("REQUESTS_CA_BUNDLE", ca_bundle.display().to_string()),
        ("HTTPS_PROXY", proxy_url.clone()),
        // Python reads the lower-case name first; a user's own https_proxy must not win.
        ("https_proxy", proxy_url),
        ("IDENTITY_ENDPOINT", format!("https://{IDENTITY_HOST}")),
        ("IDENTITY_HEADER", secret.to_owned()),
        ("MSI_ENDPOINT", format!("https://{MSI_HOST}/{secret}")),
    ]
}

/// `export` lines for a POSIX shell, then the `unset` of [`REMOVED_VARIABLES`].
pub fn export_lines(variables: &[(&'static str, String)]) -> String {
    let mut out = String::new();
    for (name, value) in variables {
        out.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    out.push_str(&format!("unset {}\n", REMOVED_VARIABLES.join(" ")));
    out
}

fn shell_quote(value: &str) -> String {
    if value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/:._-=,@+".contains(&b))
    {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Whether `az` in `config_dir` is already logged in as `identity` (a subscription in
/// `azureProfile.json` whose user is that managed identity).
pub fn logged_in(config_dir: &Path, identity: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(config_dir.join("azureProfile.json")) else {
        return false;
    };
    // az writes the file with a UTF-8 byte order mark.
    let Ok(profile) =
        serde_json::from_str::<serde_json::Value>(text.trim_start_matches('\u{feff}'))
    else {
        return false;
    };
    let wanted = format!("MSIResource-{identity}");
    profile["subscriptions"]
        .as_array()
        .is_some_and(|subscriptions| {
            subscriptions.iter().any(|s| {
                s["user"]["assignedIdentityInfo"]
                    .as_str()
                    .is_some_and(|info| info.eq_ignore_ascii_case(&wanted))
            })
        })
}

/// Whether the user's own command is a login (then azgate does not log in first).
pub fn is_login(args: &[String]) -> bool {
    args.iter()
        .find(|a| !a.starts_with('-'))
        .is_some_and(|a| a == "login")
}

/// Runs `az args…` with `variables` set and [`REMOVED_VARIABLES`] removed; stdio is inherited.
pub async fn run(
    az: &OsStr,
    variables: &[(&'static str, String)],
    args: &[String],
) -> Result<ExitStatus, WorkstationError> {
    let mut command = tokio::process::Command::new(az);
    command.args(args);
    for name in REMOVED_VARIABLES {
        command.env_remove(name);
    }
    command.envs(variables.iter().map(|(k, v)| (*k, v.as_str())));
    let mut child = command.spawn().map_err(|e| {
        WorkstationError::Az(format!(
            "cannot run {:?}: {e} (install the Azure CLI or pass --az-binary)",
            az
        ))
    })?;
    child
        .wait()
        .await
        .map_err(|e| WorkstationError::Az(format!("waiting for az: {e}")))
}

/// `az login --identity --resource-id <identity> --output none`, as `tsh apps login` runs it.
pub async fn login(
    az: &OsStr,
    variables: &[(&'static str, String)],
    identity: &str,
) -> Result<(), WorkstationError> {
    let args: Vec<String> = [
        "login",
        "--identity",
        "--resource-id",
        identity,
        "--output",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let status = run(az, variables, &args).await?;
    if !status.success() {
        return Err(WorkstationError::Az(format!(
            "`az login --identity --resource-id {identity}` failed ({status}); see az's message above"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

    #[test]
    fn login_state_is_read_from_the_profile() {
        let dir = std::env::temp_dir().join(format!("azgate-az-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!logged_in(&dir, ID));
        let profile = serde_json::json!({"subscriptions": [{"id": "s", "user": {
            "name": "userAssignedIdentity", "type": "servicePrincipal",
            "assignedIdentityInfo": format!("MSIResource-{}", ID.to_uppercase())}}]});
        std::fs::write(dir.join("azureProfile.json"), format!("\u{feff}{profile}")).unwrap();
        assert!(logged_in(&dir, ID));
        assert!(!logged_in(&dir, &ID.replace("reader", "admin")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_dirs_differ_per_identity_and_gateway() {
        let a = default_config_dir("gw:443", ID).unwrap();
        assert!(
            a.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("reader-")
        );
        assert_ne!(
            a,
            default_config_dir("gw:443", &ID.replace("reader", "admin")).unwrap()
        );
        assert_ne!(a, default_config_dir("other:443", ID).unwrap());
        assert_eq!(
            a,
            default_config_dir("gw:443", &ID.to_uppercase())
                .unwrap()
                .with_file_name(a.file_name().unwrap())
        );
    }

    #[test]
    fn exports_are_shell_quoted() {
        let lines = export_lines(&[("A", "plain/path:1".into()), ("B", "it's spaced".into())]);
        assert!(lines.contains("export A=plain/path:1\n"));
        assert!(lines.contains(r"export B='it'\''s spaced'"));
        assert!(lines.ends_with("unset NO_PROXY no_proxy IDENTITY_SERVER_THUMBPRINT IMDS_ENDPOINT MSI_SECRET AZURE_POD_IDENTITY_AUTHORITY_HOST\n"));
    }

    #[test]
    fn login_commands_are_recognised() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_login(&args(&["login", "--identity"])));
        assert!(is_login(&args(&["--debug", "login"])));
        assert!(!is_login(&args(&["vm", "list"])));
        assert!(!is_login(&args(&[])));
    }
}
