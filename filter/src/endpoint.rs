//! Is `X-Forwarded-Host` an Azure endpoint we may send a managed-identity token to?
//!
//! The rule is Teleport's (`api/utils/azure/endpoints.go`: the host equals a suffix or ends with
//! `.` + suffix) extended with the US Government and China clouds. Because the answer decides
//! where a real token goes, the accepted syntax is deliberately narrow:
//! - letters are folded to lower case (DNS is case-insensitive) and the folded name is used;
//! - an explicit `:443` is accepted and dropped; any other port is refused;
//! - IP literals (v4, v6, bracketed), userinfo (`@`), a trailing dot, empty labels, non-ASCII
//!   (including punycode look-alikes that do not end in a listed suffix) and any character
//!   outside `[a-z0-9.-]` are refused;
//! - a suffix only matches on a label boundary: `evilmanagement.azure.com` is refused.

use crate::error::Refusal;

/// An Azure cloud whose endpoints may be enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    /// Azure China (21Vianet).
    China,
    /// Azure public cloud.
    Public,
    /// Azure US Government.
    UsGov,
}

impl Cloud {
    /// Every cloud, the default.
    pub const ALL: [Cloud; 3] = [Cloud::Public, Cloud::UsGov, Cloud::China];

    /// Parses the configuration name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "public" => Some(Self::Public),
            "usgov" => Some(Self::UsGov),
            "china" => Some(Self::China),
            _ => None,
        }
    }

    /// Host suffixes of this cloud's Azure service endpoints.
    pub fn suffixes(self) -> &'static [&'static str] {
        match self {
            // Teleport's list.
            Self::Public => &[
                "management.azure.com",
                "graph.windows.net",
                "batch.core.windows.net",
                "rest.media.azure.net",
                "datalake.azure.net",
                "management.core.windows.net",
                "gallery.azure.com",
                "azuredatalakestore.net",
                "azurecr.io",
                "database.windows.net",
                "azuredatalakeanalytics.net",
                "vault.azure.net",
                "core.windows.net",
                "azurefd.net",
                "login.microsoftonline.com",
                "graph.microsoft.com",
                // Not in Teleport's list: Key Vault's Managed HSM data plane.
                "managedhsm.azure.net",
            ],
            // The same services in AzureUSGovernment (azure-cli's cloud definitions).
            Self::UsGov => &[
                "management.usgovcloudapi.net",
                "management.core.usgovcloudapi.net",
                "batch.core.usgovcloudapi.net",
                "rest.media.usgovcloudapi.net",
                "gallery.usgovcloudapi.net",
                "azurecr.us",
                "database.usgovcloudapi.net",
                "vault.usgovcloudapi.net",
                "core.usgovcloudapi.net",
                "azurefd.us",
                "login.microsoftonline.us",
                "graph.microsoft.us",
                "dod-graph.microsoft.us",
                "managedhsm.usgovcloudapi.net",
            ],
            // The same services in AzureChinaCloud.
            Self::China => &[
                "management.chinacloudapi.cn",
                "management.core.chinacloudapi.cn",
                "graph.chinacloudapi.cn",
                "batch.chinacloudapi.cn",
                "rest.media.chinacloudapi.cn",
                "gallery.chinacloudapi.cn",
                "azurecr.cn",
                "database.chinacloudapi.cn",
                "vault.azure.cn",
                "core.chinacloudapi.cn",
                "login.chinacloudapi.cn",
                "microsoftgraph.chinacloudapi.cn",
                "managedhsm.azure.cn",
            ],
        }
    }
}

/// The enabled clouds' endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    clouds: Vec<Cloud>,
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        Self::new(Cloud::ALL.to_vec())
    }
}

impl EndpointPolicy {
    /// Enables the given clouds.
    pub fn new(clouds: Vec<Cloud>) -> Self {
        Self { clouds }
    }

    /// Validates the `X-Forwarded-Host` values and returns the normalised host (lower case,
    /// no port) to use as `:authority` upstream.
    pub fn target(&self, forwarded_host_values: &[&str]) -> Result<String, Refusal> {
        let raw = match forwarded_host_values {
            [] => {
                return Err(Refusal::MissingForwardedHost(
                    "the request has no X-Forwarded-Host header naming the Azure endpoint".into(),
                ));
            }
            [one] => *one,
            _ => {
                return Err(Refusal::InvalidForwardedHost(
                    "X-Forwarded-Host must be given exactly once".into(),
                ));
            }
        };
        if raw.contains(',') {
            return Err(Refusal::InvalidForwardedHost(
                "X-Forwarded-Host must name exactly one host".into(),
            ));
        }
        let host = normalise_host(crate::headers::trim_ows(raw))
            .map_err(|why| Refusal::NotAnAzureEndpoint(format!("{}: {why}", printable(raw))))?;
        if self.is_azure_host(&host) {
            Ok(host)
        } else {
            Err(Refusal::NotAnAzureEndpoint(format!(
                "{host} is not an enabled Azure endpoint"
            )))
        }
    }

    fn is_azure_host(&self, host: &str) -> bool {
        self.clouds.iter().flat_map(|c| c.suffixes()).any(|suffix| {
            host == *suffix
                || host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1)
        })
    }
}

/// Lower-cases `host[:port]`, drops `:443`, and refuses everything but plain DNS names.
fn normalise_host(raw: &str) -> Result<String, &'static str> {
    if raw.is_empty() {
        return Err("empty host");
    }
    if raw.contains('@') {
        return Err("userinfo is not allowed");
    }
    if raw.starts_with('[') {
        return Err("IP literals are not Azure endpoints");
    }
    let host = match raw.rsplit_once(':') {
        Some((host, "443")) => host,
        Some(_) => return Err("only port 443 is allowed"),
        None => raw,
    };
    if host.ends_with('.') {
        return Err("a trailing dot is not allowed");
    }
    if host.len() > 253 {
        return Err("host name too long");
    }
    let host = host.to_ascii_lowercase();
    if !host
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("host names may only contain letters, digits, '.' and '-'");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("empty or over-long DNS label");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("DNS labels may not start or end with '-'");
        }
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok()
        || host
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("IP literals are not Azure endpoints");
    }
    Ok(host)
}

/// A log- and message-safe rendering of client input: printable ASCII, at most 100 chars.
pub fn printable(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().count() > 100 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(host: &str) -> Result<String, Refusal> {
        EndpointPolicy::default().target(&[host])
    }

    #[test]
    fn azure_hosts_of_every_cloud_are_accepted() {
        for host in [
            "management.azure.com",
            "myvault.vault.azure.net",
            "account.blob.core.windows.net",
            "graph.microsoft.com",
            "management.usgovcloudapi.net",
            "myvault.vault.usgovcloudapi.net",
            "management.chinacloudapi.cn",
            "myvault.vault.azure.cn",
        ] {
            assert_eq!(check(host).unwrap(), host);
        }
    }

    #[test]
    fn letter_case_is_folded_and_port_443_dropped() {
        assert_eq!(
            check("Management.Azure.COM").unwrap(),
            "management.azure.com"
        );
        assert_eq!(
            check("management.azure.com:443").unwrap(),
            "management.azure.com"
        );
    }

    #[test]
    fn look_alikes_and_non_azure_hosts_are_refused() {
        for host in [
            "example.com",
            "evilmanagement.azure.com",
            "management.azure.com.evil.com",
            "management.azure.co",
            "azure.com",
            "windows.net",
            "xn--mnagement-azure-com.example",
            "management.azure.com.",
            "management..azure.com",
            ".management.azure.com",
            "-x.management.azure.com",
        ] {
            let err = check(host).unwrap_err();
            assert_eq!(err.code(), "NotAnAzureEndpoint", "{host}");
        }
    }

    #[test]
    fn only_spaces_and_tabs_around_the_host_are_dropped() {
        assert_eq!(
            check(" \tmanagement.azure.com\t ").unwrap(),
            "management.azure.com"
        );
        // Unicode spaces are part of the value, so the host is not an Azure one.
        for host in ["management.azure.com\u{a0}", "\u{2003}management.azure.com"] {
            assert_eq!(check(host).unwrap_err().code(), "NotAnAzureEndpoint");
        }
    }

    #[test]
    fn ports_other_than_443_are_refused() {
        for host in [
            "management.azure.com:80",
            "management.azure.com:8443",
            "management.azure.com:",
        ] {
            assert_eq!(
                check(host).unwrap_err().code(),
                "NotAnAzureEndpoint",
                "{host}"
            );
        }
    }

    #[test]
    fn ip_literals_loopback_and_link_local_are_refused() {
        for host in [
            "169.254.169.254",
            "127.0.0.1",
            "[::1]",
            "[fe80::1]:443",
            "::1",
            "10.0.0.1:443",
        ] {
            assert_eq!(
                check(host).unwrap_err().code(),
                "NotAnAzureEndpoint",
                "{host}"
            );
        }
    }

    #[test]
    fn userinfo_and_odd_characters_are_refused() {
        for host in [
            "user@management.azure.com",
            "user:pw@management.azure.com",
            "management.azure.com/path",
            "management.azure.com?x",
            "managément.azure.com",
            "management.azure.com\0",
            "",
        ] {
            assert_eq!(
                check(host).unwrap_err().code(),
                "NotAnAzureEndpoint",
                "{host:?}"
            );
        }
    }

    #[test]
    fn header_must_be_given_exactly_once() {
        let policy = EndpointPolicy::default();
        assert_eq!(
            policy.target(&[]).unwrap_err().code(),
            "MissingForwardedHost"
        );
        assert_eq!(
            policy
                .target(&["management.azure.com", "management.azure.com"])
                .unwrap_err()
                .code(),
            "InvalidForwardedHost"
        );
        assert_eq!(
            policy
                .target(&["management.azure.com, example.com"])
                .unwrap_err()
                .code(),
            "InvalidForwardedHost"
        );
    }

    #[test]
    fn disabled_clouds_are_refused() {
        let public_only = EndpointPolicy::new(vec![Cloud::Public]);
        assert!(public_only.target(&["management.azure.com"]).is_ok());
        assert_eq!(
            public_only
                .target(&["management.chinacloudapi.cn"])
                .unwrap_err()
                .code(),
            "NotAnAzureEndpoint"
        );
    }
}
