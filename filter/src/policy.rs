//! Teleport's `azure_identities` RBAC, re-checked on every request.
//!
//! Semantics follow Teleport's `lib/services/role.go`: full ARM resource IDs compared
//! case-insensitively; `*` is refused in `allow` and means "every identity" in `deny`; deny wins;
//! unknown role names grant nothing. On top of the roles, the selected identity must be one of the
//! identities the certificate itself lists (OID 1.3.9999.1.17), because that list is what the
//! issuer computed when it minted the certificate. Role values may be templates
//! (`{{internal.azure_identities}}`, see [`crate::template`]), expanded per request from the
//! traits in the caller's certificate; deny templates expand too.

use std::collections::HashMap;

use crate::error::Refusal;
use crate::template::{Template, Traits};

/// A managed identity's ARM resource ID, validated and kept in its original spelling, with a
/// lower-cased copy for comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityId {
    original: String,
    folded: String,
}

impl IdentityId {
    /// Parses `/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`,
    /// case-insensitively. Unlike Teleport's regexp, dots and parentheses are accepted in
    /// names because Azure allows them.
    pub fn parse(value: &str) -> Result<Self, String> {
        let segments: Vec<&str> = value.split('/').collect();
        let shape_ok = segments.len() == 9
            && segments[0].is_empty()
            && segments[1].eq_ignore_ascii_case("subscriptions")
            && segments[3].eq_ignore_ascii_case("resourceGroups")
            && segments[5].eq_ignore_ascii_case("providers")
            && segments[6].eq_ignore_ascii_case("Microsoft.ManagedIdentity")
            && segments[7].eq_ignore_ascii_case("userAssignedIdentities");
        if !shape_ok {
            return Err(format!(
                "{value:?} is not a managed identity resource ID \
                 (/subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>)"
            ));
        }
        let subscription = segments[2];
        if subscription.is_empty()
            || !subscription
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(format!(
                "{value:?}: subscription id must be hex digits and dashes"
            ));
        }
        let name_ok = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'))
        };
        if !name_ok(segments[4], 90) {
            return Err(format!("{value:?}: invalid resource group name"));
        }
        if !name_ok(segments[8], 128) {
            return Err(format!("{value:?}: invalid identity name"));
        }
        Ok(Self {
            original: value.to_string(),
            folded: value.to_ascii_lowercase(),
        })
    }

    /// The ID as written.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The lower-cased ID used for comparisons and cache keys.
    pub fn folded(&self) -> &str {
        &self.folded
    }

    /// The identity's name, the last path segment.
    pub fn name(&self) -> &str {
        self.original.rsplit('/').next().unwrap_or_default()
    }
}

/// One role's `azure_identities` rules, already validated: literal IDs and templates.
#[derive(Clone, Debug, Default)]
pub struct RoleRules {
    /// What this role allows: validated IDs as written, or templates (compared
    /// case-insensitively once expanded).
    pub allow: Vec<Template>,
    /// What this role denies; an expansion to `*` denies everything, as a literal `*` does.
    pub deny: Vec<Template>,
    /// `deny` contained a literal `*`.
    pub deny_all: bool,
}

impl RoleRules {
    /// The identities this role allows a user with `traits`: literals, and expansions that are
    /// valid identity IDs (anything else, `*` included, grants nothing).
    fn allowed(&self, traits: &Traits) -> Vec<String> {
        let mut out = Vec::new();
        for template in &self.allow {
            if template.is_literal() {
                out.extend(template.expand(traits));
                continue;
            }
            out.extend(
                template
                    .expand(traits)
                    .iter()
                    .filter_map(|value| IdentityId::parse(value).ok())
                    .map(|id| id.as_str().to_string()),
            );
        }
        out
    }

    /// Whether this role denies `folded` (a lower-cased identity ID) to a user with `traits`.
    fn denies(&self, traits: &Traits, folded: &str) -> bool {
        self.deny_all
            || self.deny.iter().any(|template| {
                template
                    .expand(traits)
                    .iter()
                    .any(|value| value == "*" || value.eq_ignore_ascii_case(folded))
            })
    }
}

/// The roles the configuration defines, by role name (case-sensitive, as in Teleport).
#[derive(Clone, Debug, Default)]
pub struct RoleSet {
    roles: HashMap<String, RoleRules>,
}

impl RoleSet {
    /// Adds a role; returns false if the name was already defined.
    pub fn insert(&mut self, name: String, rules: RoleRules) -> bool {
        self.roles.insert(name, rules).is_none()
    }

    /// Number of roles defined.
    pub fn len(&self) -> usize {
        self.roles.len()
    }

    /// True if no role is defined.
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The rules of role `name`, if it is defined.
    pub fn role(&self, name: &str) -> Option<&RoleRules> {
        self.roles.get(name)
    }

    /// The identities a user holding `user_roles` with `traits` may assume, as Teleport computes
    /// them when it issues an app certificate: every identity some role allows, minus every
    /// identity any role denies (`*` in a deny rule denies all). Spelling is the first allow
    /// rule's; duplicates (case-insensitively) are listed once, in role order.
    pub fn allowed_identities(&self, user_roles: &[String], traits: &Traits) -> Vec<String> {
        let rules: Vec<&RoleRules> = user_roles
            .iter()
            .filter_map(|name| self.roles.get(name))
            .collect();
        let mut allowed: Vec<String> = Vec::new();
        for id in rules.iter().flat_map(|r| r.allowed(traits)) {
            let folded = id.to_ascii_lowercase();
            let denied = rules.iter().any(|r| r.denies(traits, &folded));
            if !denied && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&id)) {
                allowed.push(id);
            }
        }
        allowed
    }

    /// Decides whether a user holding `user_roles` with `traits` may use `selected`, given the
    /// identities the certificate lists as allowed.
    pub fn check(
        &self,
        user_roles: &[String],
        traits: &Traits,
        selected: &IdentityId,
        cert_allowed: &[String],
    ) -> Result<(), Refusal> {
        let wanted = selected.folded();
        if let Some(denier) = user_roles.iter().find(|name| {
            self.roles
                .get(*name)
                .is_some_and(|r| r.denies(traits, wanted))
        }) {
            return Err(Refusal::IdentityNotAllowed(format!(
                "Azure identity {:?} is denied by role {denier:?}",
                selected.name()
            )));
        }
        let allows = |r: &RoleRules| {
            r.allowed(traits)
                .iter()
                .any(|a| a.eq_ignore_ascii_case(wanted))
        };
        if !user_roles
            .iter()
            .filter_map(|name| self.roles.get(name))
            .any(allows)
        {
            return Err(Refusal::IdentityNotAllowed(format!(
                "none of the roles [{}] allows Azure identity {:?}",
                user_roles.join(", "),
                selected.name()
            )));
        }
        if !cert_allowed.iter().any(|a| a.eq_ignore_ascii_case(wanted)) {
            return Err(Refusal::IdentityNotInCertificate(format!(
                "Azure identity {:?} is not among the identities this certificate was issued for",
                selected.name()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READER: &str = "/subscriptions/0000-1111/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
    const ADMIN: &str = "/subscriptions/0000-1111/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/admin";

    fn roles() -> RoleSet {
        let mut set = RoleSet::default();
        set.insert(
            "azure-reader".into(),
            RoleRules {
                allow: vec![lit(READER)],
                ..Default::default()
            },
        );
        set.insert(
            "azure-admin".into(),
            RoleRules {
                allow: vec![lit(ADMIN), lit(READER)],
                ..Default::default()
            },
        );
        set.insert(
            "no-admin".into(),
            RoleRules {
                deny: vec![lit(&ADMIN.to_ascii_lowercase())],
                ..Default::default()
            },
        );
        set.insert(
            "lockdown".into(),
            RoleRules {
                deny_all: true,
                ..Default::default()
            },
        );
        set
    }

    fn lit(s: &str) -> Template {
        Template::Literal(s.to_string())
    }

    fn id(s: &str) -> IdentityId {
        IdentityId::parse(s).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn allowed_identity_in_certificate_passes() {
        roles()
            .check(
                &names(&["azure-reader"]),
                &Traits::new(),
                &id(READER),
                &names(&[READER]),
            )
            .unwrap();
    }

    #[test]
    fn comparison_ignores_case_everywhere() {
        let upper = READER
            .to_ascii_uppercase()
            .replace("/SUBSCRIPTIONS", "/subscriptions");
        roles()
            .check(
                &names(&["azure-reader"]),
                &Traits::new(),
                &id(&upper),
                &names(&[&READER.to_ascii_lowercase()]),
            )
            .unwrap();
    }

    #[test]
    fn deny_wins_over_allow() {
        let err = roles()
            .check(
                &names(&["azure-admin", "no-admin"]),
                &Traits::new(),
                &id(ADMIN),
                &names(&[ADMIN]),
            )
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotAllowed");
        assert!(err.message().contains("no-admin"));
    }

    #[test]
    fn wildcard_deny_denies_everything() {
        let err = roles()
            .check(
                &names(&["azure-reader", "lockdown"]),
                &Traits::new(),
                &id(READER),
                &names(&[READER]),
            )
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotAllowed");
    }

    #[test]
    fn unknown_roles_grant_nothing() {
        let err = roles()
            .check(
                &names(&["ghost"]),
                &Traits::new(),
                &id(READER),
                &names(&[READER]),
            )
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotAllowed");
    }

    #[test]
    fn role_must_allow_the_selected_identity() {
        let err = roles()
            .check(
                &names(&["azure-reader"]),
                &Traits::new(),
                &id(ADMIN),
                &names(&[ADMIN]),
            )
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotAllowed");
    }

    #[test]
    fn selected_identity_must_be_listed_in_the_certificate() {
        let err = roles()
            .check(
                &names(&["azure-admin"]),
                &Traits::new(),
                &id(ADMIN),
                &names(&[READER]),
            )
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotInCertificate");
    }

    #[test]
    fn identity_ids_are_validated() {
        assert!(IdentityId::parse(READER).is_ok());
        assert!(IdentityId::parse("/subscriptions/0/resourceGroups/rg.x/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a_b(1)").is_ok());
        for bad in [
            "",
            "*",
            "reader",
            "/subscriptions/zz/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
            "/subscriptions/00/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x",
            "/subscriptions/00/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
            "/subscriptions/00/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a/b",
            "/subscriptions/00/resourceGroups/r g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
        ] {
            assert!(IdentityId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn allowed_identities_are_allow_minus_deny_across_roles() {
        let set = roles();
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            set.allowed_identities(&names(&["azure-admin"]), &Traits::new()),
            [ADMIN, READER]
        );
        // Deny in another role removes the identity; duplicates are listed once.
        assert_eq!(
            set.allowed_identities(
                &names(&["azure-admin", "azure-reader", "no-admin"]),
                &Traits::new()
            ),
            [READER]
        );
        // `*` in deny removes everything; unknown roles grant nothing.
        assert!(
            set.allowed_identities(&names(&["azure-admin", "lockdown"]), &Traits::new())
                .is_empty()
        );
        assert!(
            set.allowed_identities(&names(&["ghost"]), &Traits::new())
                .is_empty()
        );
        assert!(set.role("azure-reader").is_some() && set.role("ghost").is_none());
    }

    #[test]
    fn templates_expand_from_the_callers_traits_in_allow_and_deny() {
        let template = |t: &str| Template::parse(t).unwrap();
        let mut set = RoleSet::default();
        set.insert(
            "access".into(),
            RoleRules {
                allow: vec![template("{{internal.azure_identities}}")],
                ..Default::default()
            },
        );
        set.insert(
            "no-team-admin".into(),
            RoleRules {
                deny: vec![template("{{external.denied}}")],
                ..Default::default()
            },
        );
        let traits = |pairs: &[(&str, &[&str])]| -> Traits {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        let alice = traits(&[("azure_identities", &[READER, ADMIN, "not-an-id", "*"])]);
        let roles = names(&["access", "no-team-admin"]);
        // Invalid IDs and `*` from a trait grant nothing.
        assert_eq!(set.allowed_identities(&roles, &alice), [READER, ADMIN]);
        set.check(&roles, &alice, &id(ADMIN), &names(&[ADMIN]))
            .unwrap();
        // No trait: the template grants nothing.
        let err = set
            .check(&roles, &Traits::new(), &id(READER), &names(&[READER]))
            .unwrap_err();
        assert_eq!(err.code(), "IdentityNotAllowed");
        // A deny template expands too; to `*` it denies everything.
        let mut bob = alice.clone();
        bob.insert("denied".into(), vec![ADMIN.to_ascii_uppercase()]);
        assert_eq!(set.allowed_identities(&roles, &bob), [READER]);
        assert!(
            set.check(&roles, &bob, &id(ADMIN), &names(&[ADMIN]))
                .is_err()
        );
        bob.insert("denied".into(), vec!["*".into()]);
        assert!(set.allowed_identities(&roles, &bob).is_empty());
    }
}
