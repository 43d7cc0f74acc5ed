//! `azgate ca ...` and `azgate identities`: the dev CA and what a certificate allows.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use azgate::pki::{self, AppCertificate, AppKey, CertificateAuthority, KeyKind, PkiError};
use azgate::workstation::WorkstationError;
use azgate::workstation::az::{self};
use clap::{Args, Subcommand};

use super::CliResult;

/// `azgate ca ...`
#[derive(Subcommand, Debug)]
pub(crate) enum CaCommand {
    /// Create a dev CA (ECDSA P-256): `ca.crt` and `ca.key` (mode 0600) in its directory.
    Init {
        /// CA directory [default: $AZGATE_HOME/ca, else ~/.azgate/ca].
        #[arg(long, env = "AZGATE_CA_DIR")]
        dir: Option<PathBuf>,
        /// Common name of the CA certificate.
        #[arg(long, default_value = "azgate dev CA")]
        name: String,
        /// CA lifetime, e.g. 8760h or 365d.
        #[arg(long, default_value = "365d", value_parser = pki::parse_duration)]
        ttl: Duration,
    },
    /// Issue a Teleport-format app certificate (CN = user, O = roles, OIDs 1.3.9999.1.16/.17)
    /// whose allowed identities are computed from the role files (allow minus deny).
    Issue(Box<IssueArgs>),
    /// Issue a TLS server certificate (for a dev gateway).
    Server {
        /// CA directory [default: $AZGATE_HOME/ca].
        #[arg(long, env = "AZGATE_CA_DIR")]
        dir: Option<PathBuf>,
        /// DNS names (repeatable; the first is the CN).
        #[arg(long = "dns", required = true)]
        dns_names: Vec<String>,
        /// IP addresses (repeatable).
        #[arg(long = "ip")]
        ip_addresses: Vec<IpAddr>,
        /// Lifetime.
        #[arg(long, default_value = "30d", value_parser = pki::parse_duration)]
        ttl: Duration,
        /// Output prefix: writes PREFIX.crt and PREFIX.key [default: ./<first DNS name>].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `azgate ca issue` flags.
#[derive(Args, Debug)]
pub(crate) struct IssueArgs {
    /// The user (CN).
    #[arg(long)]
    user: String,
    /// The user's roles, comma-separated (one O attribute each).
    #[arg(long, value_delimiter = ',', required = true)]
    roles: Vec<String>,
    /// Teleport role files, YAML or JSON (repeatable) [default: every *.yaml, *.yml and *.json
    /// in the CA directory's roles/].
    #[arg(long = "role-file")]
    role_files: Vec<PathBuf>,
    /// A user trait, NAME=VALUE (repeatable; values of one name accumulate), written in the
    /// certificate's PostalCode as Teleport writes traits and used to expand role templates
    /// such as `{{internal.azure_identities}}` (like `tctl users update --set-azure-identities`).
    #[arg(long = "trait", value_name = "NAME=VALUE", value_parser = parse_trait)]
    traits: Vec<(String, String)>,
    /// The app the certificate routes to (OID 1.3.9999.1.10), as `tsh apps login <app>`.
    #[arg(long, default_value = "azure-cli")]
    app: String,
    /// The Teleport cluster of that app (OID 1.3.9999.1.5).
    #[arg(long, default_value = "azgate-dev")]
    cluster: String,
    /// The identity to select: full resource ID or bare name; may be left out when the roles
    /// allow exactly one.
    #[arg(long)]
    azure_identity: Option<String>,
    /// Certificate lifetime, e.g. 12h, 30m, 1h30m.
    #[arg(long, default_value = "12h", value_parser = pki::parse_duration)]
    ttl: Duration,
    /// Key type: ecdsa (P-256) or rsa (2048).
    #[arg(long, default_value = "ecdsa")]
    key_type: KeyKind,
    /// CA directory [default: $AZGATE_HOME/ca].
    #[arg(long, env = "AZGATE_CA_DIR")]
    dir: Option<PathBuf>,
    /// Output prefix: writes PREFIX.crt and PREFIX.key (0600) [default: ./<user>].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `azgate identities` flags.
#[derive(Args, Debug)]
pub(crate) struct IdentitiesArgs {
    /// The app certificate (PEM).
    #[arg(long, env = "AZGATE_CERT")]
    cert: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(super) fn ca_dir(dir: Option<PathBuf>) -> Result<PathBuf, WorkstationError> {
    match dir {
        Some(dir) => Ok(dir),
        None => Ok(az::azgate_home()?.join("ca")),
    }
}

pub(super) fn read(path: &Path, what: &str) -> Result<String, PkiError> {
    std::fs::read_to_string(path)
        .map_err(|e| PkiError::Invalid(format!("{what} {}: {e}", path.display())))
}

/// `azgate ca ...`
pub(crate) fn ca(command: CaCommand) -> CliResult<()> {
    match command {
        CaCommand::Init { dir, name, ttl } => {
            let dir = ca_dir(dir)?;
            let ca = CertificateAuthority::generate(&name, ttl)?;
            ca.save(&dir)?;
            pki::create_private_dir(&dir.join("roles"))?;
            println!("CA certificate: {}", dir.join(pki::CA_CERT_FILE).display());
            println!("CA key:         {}", dir.join(pki::CA_KEY_FILE).display());
            println!("role files:     {}/", dir.join("roles").display());
            Ok(())
        }
        CaCommand::Issue(args) => issue(*args),
        CaCommand::Server {
            dir,
            dns_names,
            ip_addresses,
            ttl,
            out,
        } => {
            let ca = CertificateAuthority::load(&ca_dir(dir)?)?;
            let key = AppKey::generate(KeyKind::P256)?;
            let names: Vec<&str> = dns_names.iter().map(String::as_str).collect();
            let now = SystemTime::now();
            let not_after = checked_not_after(&ca, now + ttl)?;
            let cert = ca.issue_server(
                &names,
                &ip_addresses,
                key.public_key_info()?,
                now - Duration::from_secs(60),
                not_after,
            )?;
            let prefix = out.unwrap_or_else(|| PathBuf::from(&dns_names[0]));
            write_pair(&prefix, &cert, &key)?;
            Ok(())
        }
    }
}

fn checked_not_after(
    ca: &CertificateAuthority,
    not_after: SystemTime,
) -> Result<SystemTime, PkiError> {
    if not_after > ca.not_after() {
        return Err(PkiError::Invalid(
            "--ttl reaches past the CA's own expiry; shorten it or create a new CA".into(),
        ));
    }
    Ok(not_after)
}

fn write_pair(prefix: &Path, cert: &str, key: &AppKey) -> Result<(), PkiError> {
    let with = |ext: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let (cert_path, key_path) = (with(".crt"), with(".key"));
    pki::write_file(&cert_path, cert, false)?;
    pki::write_file(&key_path, &key.to_pem()?, true)?;
    println!("certificate: {}", cert_path.display());
    println!("key:         {}", key_path.display());
    Ok(())
}

fn issue(args: IssueArgs) -> CliResult<()> {
    let dir = ca_dir(args.dir)?;
    let ca = CertificateAuthority::load(&dir)?;
    let role_files = if args.role_files.is_empty() {
        role_files_in(&dir.join("roles"))?
    } else {
        args.role_files
    };
    if role_files.is_empty() {
        return Err(PkiError::Invalid(format!(
            "no role files: pass --role-file or put Teleport roles in {}/",
            dir.join("roles").display()
        ))
        .into());
    }
    let roles = pki::load_roles(&role_files)?;
    let user_roles: Vec<String> = args
        .roles
        .iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect();
    let mut traits = pki::Traits::new();
    for (name, value) in args.traits {
        traits.entry(name).or_default().push(value);
    }
    let allowed = pki::allowed_identities(&roles, &user_roles, &traits)?;
    let selected = pki::select_identity(&allowed, args.azure_identity.as_deref())?;
    if args.user.trim().is_empty() {
        return Err(PkiError::Invalid("--user must not be empty".into()).into());
    }
    let key = AppKey::generate(args.key_type)?;
    let now = SystemTime::now();
    let spec = AppCertificate {
        user: Some(args.user.clone()),
        roles: user_roles,
        selected_identity: Some(selected.clone()),
        allowed_identities: allowed,
        traits,
        usage: vec![pki::USAGE_APPS.into()],
        app_name: Some(args.app),
        app_cluster: Some(args.cluster),
        not_before: now - Duration::from_secs(60),
        not_after: checked_not_after(&ca, now + args.ttl)?,
    };
    let cert = ca.issue_app(&spec, key.public_key_info()?)?;
    let prefix = args.out.unwrap_or_else(|| PathBuf::from(&args.user));
    write_pair(&prefix, &cert, &key)?;
    println!("user:        {}", args.user);
    println!("identity:    {selected}");
    println!("valid for:   {}", human_duration(args.ttl));
    Ok(())
}

/// `NAME=VALUE` of `--trait`.
fn parse_trait(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

fn role_files_in(dir: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PkiError::Io(dir.to_owned(), e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn human_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    match (s / 86_400, (s % 86_400) / 3_600, (s % 3_600) / 60, s % 60) {
        (0, 0, 0, sec) => format!("{sec}s"),
        (0, 0, m, _) => format!("{m}m"),
        (0, h, m, _) => format!("{h}h{m:02}m"),
        (d, h, _, _) => format!("{d}d{h}h"),
    }
}

/// `azgate identities`: what a certificate allows.
pub(crate) fn identities(args: IdentitiesArgs) -> CliResult<()> {
    let pem = read(&args.cert, "--cert")?;
    let identity = azgate_filter::identity::parse_app_certificate(&pem)
        .map_err(|refusal| PkiError::Invalid(format!("--cert: {}", refusal.message())))?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let expired = identity.not_after <= now;
    if args.json {
        let json = serde_json::json!({
            "user": identity.user,
            "roles": identity.roles,
            "selected_identity": identity.selected_identity,
            "allowed_identities": identity.allowed_identities,
            "not_before": identity.not_before,
            "not_after": identity.not_after,
            "expired": expired,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("user:     {}", identity.user);
    println!("roles:    {}", identity.roles.join(", "));
    let validity = if expired {
        "EXPIRED".to_owned()
    } else {
        format!(
            "expires in {}",
            human_duration(Duration::from_secs(
                (identity.not_after - now).unsigned_abs()
            ))
        )
    };
    println!("validity: {validity}");
    println!("Azure identities (* = selected):");
    if identity.allowed_identities.is_empty() {
        println!("  (none)");
    }
    for id in &identity.allowed_identities {
        let mark = identity
            .selected_identity
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case(id));
        println!("{} {id}", if mark { "*" } else { " " });
    }
    Ok(())
}
