//! Token audiences as Azure expects them: the v1 resource ↔ v2 scope rule, and the data planes
//! whose clients ask for their token only after a bearer challenge.
//!
//! The Key Vault SDKs send a client's first request without `Authorization`, on purpose, and
//! ask their credential for a token only after the service's `401` +
//! `WWW-Authenticate: Bearer authorization=…, resource=…`; without that header they give up
//! ("Challenge cannot be empty"). Storage answers token-less requests the same way (with its own
//! parameter names). The gateway answers such a request itself, after the certificate, RBAC and
//! endpoint checks, with the challenge the service would send: it is never forwarded.

use crate::endpoint::Cloud;

/// How a data plane spells its challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeStyle {
    /// Key Vault and Managed HSM: `Bearer authorization="<authority>/<tenant>", resource="<r>"`.
    KeyVault,
    /// Storage: `Bearer authorization_uri=<authority>/<tenant>/oauth2/authorize resource_id=<r>`.
    Storage,
}

/// A data plane that challenges token-less requests: hosts `*.<suffix>` of one cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPlane {
    /// Host suffix (a request host must end with `.` + suffix).
    pub suffix: &'static str,
    /// The v1 resource its tokens are for.
    pub resource: &'static str,
    /// Its challenge syntax.
    pub style: ChallengeStyle,
    /// The cloud it belongs to (which decides the authority host).
    pub cloud: Cloud,
}

const fn plane(
    cloud: Cloud,
    suffix: &'static str,
    resource: &'static str,
    style: ChallengeStyle,
) -> DataPlane {
    DataPlane {
        suffix,
        resource,
        style,
        cloud,
    }
}

/// Storage tokens have one audience in every cloud.
const STORAGE: &str = "https://storage.azure.com";

/// The services a storage account serves, each under its own host label
/// (`<account>.blob.core.windows.net`).
const STORAGE_SERVICES: &[&str] = &["blob", "queue", "table", "file", "dfs"];

/// Every challenging data plane, the one table. A Storage row's suffix is the cloud's storage
/// domain; the host's label before it must be one of [`STORAGE_SERVICES`].
pub const DATA_PLANES: &[DataPlane] = {
    use ChallengeStyle::{KeyVault, Storage};
    use Cloud::{China, Public, UsGov};
    &[
        plane(
            Public,
            "vault.azure.net",
            "https://vault.azure.net",
            KeyVault,
        ),
        plane(
            Public,
            "managedhsm.azure.net",
            "https://managedhsm.azure.net",
            KeyVault,
        ),
        plane(Public, "core.windows.net", STORAGE, Storage),
        plane(
            UsGov,
            "vault.usgovcloudapi.net",
            "https://vault.usgovcloudapi.net",
            KeyVault,
        ),
        plane(
            UsGov,
            "managedhsm.usgovcloudapi.net",
            "https://managedhsm.usgovcloudapi.net",
            KeyVault,
        ),
        plane(UsGov, "core.usgovcloudapi.net", STORAGE, Storage),
        plane(China, "vault.azure.cn", "https://vault.azure.cn", KeyVault),
        plane(
            China,
            "managedhsm.azure.cn",
            "https://managedhsm.azure.cn",
            KeyVault,
        ),
        plane(China, "core.chinacloudapi.cn", STORAGE, Storage),
    ]
};

/// The v2 scope for a v1 resource: the resource + `/.default`, also after a slash the resource
/// ends with (`https://management.core.windows.net/` →
/// `https://management.core.windows.net//.default`: Entra ID takes everything before the last
/// `/` as the resource, so a single slash would ask for another audience). A value that already
/// is a scope is returned as is.
pub fn scope_for_resource(resource: &str) -> String {
    if resource.ends_with("/.default") {
        resource.to_owned()
    } else {
        format!("{resource}/.default")
    }
}

/// The v1 resource for a v2 scope (`/.default` dropped), or a resource as is.
pub fn resource_for_scope(scope: &str) -> &str {
    scope.strip_suffix("/.default").unwrap_or(scope)
}

/// The data plane serving `host` (normalised: lower case, no port), if it challenges.
pub fn data_plane(host: &str) -> Option<&'static DataPlane> {
    DATA_PLANES.iter().find(|plane| {
        let Some(head) = host
            .strip_suffix(plane.suffix)
            .and_then(|head| head.strip_suffix('.'))
            .filter(|head| !head.is_empty())
        else {
            return false;
        };
        match plane.style {
            ChallengeStyle::KeyVault => true,
            ChallengeStyle::Storage => head.rsplit_once('.').is_some_and(|(account, service)| {
                !account.is_empty() && STORAGE_SERVICES.contains(&service)
            }),
        }
    })
}

impl Cloud {
    /// The Entra ID authority host of this cloud.
    pub fn authority_host(self) -> &'static str {
        match self {
            Self::Public => "https://login.microsoftonline.com",
            Self::UsGov => "https://login.microsoftonline.us",
            Self::China => "https://login.chinacloudapi.cn",
        }
    }
}

impl DataPlane {
    /// The `WWW-Authenticate` value this service sends to a token-less request, naming
    /// `tenant` (validated by the configuration: letters, digits, `.` and `-`).
    pub fn challenge(&self, tenant: &str) -> String {
        let authority = self.cloud.authority_host();
        match self.style {
            ChallengeStyle::KeyVault => format!(
                "Bearer authorization=\"{authority}/{tenant}\", resource=\"{}\"",
                self.resource
            ),
            ChallengeStyle::Storage => format!(
                "Bearer authorization_uri={authority}/{tenant}/oauth2/authorize resource_id={}",
                self.resource
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_resources_map_both_ways() {
        for (resource, scope) in [
            (
                "https://vault.azure.net",
                "https://vault.azure.net/.default",
            ),
            (
                "https://storage.azure.com",
                "https://storage.azure.com/.default",
            ),
            (
                "https://management.core.windows.net/",
                "https://management.core.windows.net//.default",
            ),
            (
                "https://management.azure.com/",
                "https://management.azure.com//.default",
            ),
            ("api://azgate-audit", "api://azgate-audit/.default"),
        ] {
            assert_eq!(scope_for_resource(resource), scope, "{resource}");
            assert_eq!(resource_for_scope(scope), resource, "{scope}");
        }
        // ARM accepts its audience with or without the slash.
        assert_eq!(
            resource_for_scope("https://management.azure.com/.default"),
            "https://management.azure.com"
        );
        assert_eq!(
            resource_for_scope("https://graph.microsoft.com/.default"),
            "https://graph.microsoft.com"
        );
        // Scopes and plain resources pass through.
        assert_eq!(
            scope_for_resource("https://vault.azure.net/.default"),
            "https://vault.azure.net/.default"
        );
        assert_eq!(
            resource_for_scope("https://vault.azure.net"),
            "https://vault.azure.net"
        );
    }

    #[test]
    fn data_planes_are_found_on_a_label_boundary_only() {
        let vault = data_plane("myvault.vault.azure.net").map(|p| p.resource);
        assert_eq!(vault, Some("https://vault.azure.net"));
        assert_eq!(
            data_plane("acct.blob.core.windows.net").map(|p| p.resource),
            Some(STORAGE)
        );
        assert_eq!(
            data_plane("hsm.managedhsm.azure.cn").map(|p| p.resource),
            Some("https://managedhsm.azure.cn")
        );
        for host in [
            "vault.azure.net",
            "evilvault.azure.net",
            "management.azure.com",
            "acct.core.windows.net",
            "blob.core.windows.net",
            "acct.web.core.windows.net",
            "graph.microsoft.com",
        ] {
            assert_eq!(data_plane(host), None, "{host}");
        }
    }

    #[test]
    fn challenges_are_spelt_as_each_service_does() {
        let vault = data_plane("v.vault.usgovcloudapi.net").map(|p| p.challenge("tenant-1"));
        assert_eq!(
            vault.as_deref(),
            Some(
                "Bearer authorization=\"https://login.microsoftonline.us/tenant-1\", \
                 resource=\"https://vault.usgovcloudapi.net\""
            )
        );
        let blob = data_plane("a.blob.core.windows.net").map(|p| p.challenge("common"));
        assert_eq!(
            blob.as_deref(),
            Some(
                "Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize \
                 resource_id=https://storage.azure.com"
            )
        );
    }

    #[test]
    fn every_data_plane_is_an_enabled_endpoint_of_its_cloud() {
        for plane in DATA_PLANES {
            let host = format!("x.blob.{}", plane.suffix);
            assert_eq!(data_plane(&host), Some(plane), "{host}");
            let policy = crate::endpoint::EndpointPolicy::new(vec![plane.cloud]);
            assert_eq!(policy.target(&[&host]).as_deref(), Ok(host.as_str()));
        }
    }
}
