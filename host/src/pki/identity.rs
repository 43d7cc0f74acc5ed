//! Which Azure identities a user may assume, and which one a certificate selects, as Teleport computes them when it issues an app certificate.

use std::path::PathBuf;

use azgate_filter::config::parse_roles;
use azgate_filter::policy::RoleSet;
use azgate_filter::template::Traits;

use super::PkiError;

/// Reads Teleport role files the way `azgate serve` reads its `filter.role_files`
/// ([`crate::config::teleport::read_role_file`], which validates each file with the filter's own rules and
/// names it in errors), then the roles of all files together (a name defined in two files), so
/// the dev CA and the gateway agree on every role.
pub fn load_roles(paths: &[PathBuf]) -> Result<RoleSet, PkiError> {
    let mut all = Vec::new();
    for path in paths {
        let roles = crate::config::teleport::read_role_file(path)
            .map_err(|e| PkiError::Invalid(e.to_string()))?;
        if roles.is_empty() {
            return Err(PkiError::Invalid(format!(
                "{}: no roles in the file",
                path.display()
            )));
        }
        all.extend(roles);
    }
    parse_roles(all).map_err(|e| PkiError::Invalid(format!("role files: {e}")))
}

/// The identities `user_roles` allow a user with `traits` (templates expanded), refusing role
/// names the role files do not define (Teleport refuses to issue for a role that does not exist).
pub fn allowed_identities(
    roles: &RoleSet,
    user_roles: &[String],
    traits: &Traits,
) -> Result<Vec<String>, PkiError> {
    if user_roles.is_empty() {
        return Err(PkiError::Invalid("--roles names no role".into()));
    }
    if let Some(unknown) = user_roles.iter().find(|name| roles.role(name).is_none()) {
        return Err(PkiError::Invalid(format!(
            "role {unknown:?} is not defined in the role files"
        )));
    }
    Ok(roles.allowed_identities(user_roles, traits))
}

/// Chooses the identity for the certificate as `tsh apps login --azure-identity` does: with no
/// choice, the only allowed identity; otherwise a case-insensitive match on the full resource
/// ID, else on the name after `/Microsoft.ManagedIdentity/userAssignedIdentities/`.
pub fn select_identity(allowed: &[String], wanted: Option<&str>) -> Result<String, PkiError> {
    let listing = |ids: &[String]| ids.iter().map(|id| format!("\n  {id}")).collect::<String>();
    if allowed.is_empty() {
        return Err(PkiError::Selection(
            "no Azure identities available: the roles allow none (or deny them all)".into(),
        ));
    }
    let Some(wanted) = wanted.map(str::trim).filter(|w| !w.is_empty()) else {
        return match allowed {
            [only] => Ok(only.clone()),
            _ => Err(PkiError::Selection(format!(
                "multiple Azure identities available, choose one with --azure-identity:{}",
                listing(allowed)
            ))),
        };
    };
    if let Some(exact) = allowed.iter().find(|id| id.eq_ignore_ascii_case(wanted)) {
        return Ok(exact.clone());
    }
    let suffix =
        format!("/Microsoft.ManagedIdentity/userAssignedIdentities/{wanted}").to_ascii_lowercase();
    let matches: Vec<String> = allowed
        .iter()
        .filter(|id| id.to_ascii_lowercase().ends_with(&suffix))
        .cloned()
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(PkiError::Selection(format!(
            "failed to find the Azure identity matching {wanted:?}; allowed identities:{}",
            listing(allowed)
        ))),
        _ => Err(PkiError::Selection(format!(
            "Azure identity {wanted:?} is ambiguous, give the full resource ID; matches:{}",
            listing(&matches)
        ))),
    }
}
