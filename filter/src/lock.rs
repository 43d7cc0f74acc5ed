//! Teleport locks (`kind: lock`, as `tctl lock` creates them and `tctl get locks` prints them),
//! checked on every request as the Teleport App Service checks them (`CheckLockInForce`).
//!
//! A lock is in force until `spec.expires` (RFC 3339; none: forever). It applies to a request
//! when any target field it sets names something the caller's certificate carries: `user` (the
//! CN) or `role` (any O). Teleport's other targets (`login`, `node`/`server_id`, `mfa_device`,
//! `device`, `access_request`, `windows_desktop`, `bot_instance_id`, `join_token`) name nothing
//! an app certificate carries here, so they never match; [`LockSet::ignored`] lists the locks
//! that set only those, for the configuration log.

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::Refusal;
use crate::resource::RawMetadata;

/// One lock, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// `metadata.name`.
    pub name: String,
    /// `spec.target.user`.
    user: Option<String>,
    /// `spec.target.role`.
    role: Option<String>,
    /// `spec.message`.
    message: Option<String>,
    /// `spec.expires`, Unix seconds.
    expires: Option<i64>,
}

/// Every lock of the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockSet {
    locks: Vec<Lock>,
    ignored: Vec<String>,
}

#[derive(Deserialize)]
struct RawLock {
    kind: Option<String>,
    metadata: Option<RawMetadata>,
    spec: Option<RawSpec>,
}

#[derive(Deserialize)]
struct RawSpec {
    target: Option<serde_json::Map<String, serde_json::Value>>,
    message: Option<String>,
    expires: Option<String>,
}

/// The target fields Teleport defines (`types.LockTarget`); azgate matches `user` and `role`.
const TARGET_FIELDS: &[&str] = &[
    "user",
    "role",
    "login",
    "node",
    "server_id",
    "mfa_device",
    "windows_desktop",
    "access_request",
    "device",
    "bot_instance_id",
    "join_token",
];

impl LockSet {
    /// Parses locks (JSON values, one per lock); the error names the field, e.g.
    /// `locks[2].spec.expires`.
    pub fn parse(values: Vec<serde_json::Value>) -> Result<Self, (String, String)> {
        let mut set = Self::default();
        for (i, value) in values.into_iter().enumerate() {
            let at = |rest: &str| format!("locks[{i}]{rest}");
            let raw: RawLock =
                serde_json::from_value(value).map_err(|e| (at(""), e.to_string()))?;
            if raw.kind.as_deref() != Some("lock") {
                return Err((
                    at(".kind"),
                    format!("expected \"lock\", got {:?}", raw.kind.unwrap_or_default()),
                ));
            }
            let name = RawMetadata::name_of(raw.metadata)
                .ok_or_else(|| (at(".metadata.name"), "required".to_string()))?;
            let spec = raw
                .spec
                .ok_or_else(|| (at(".spec"), "required".to_string()))?;
            let target = spec.target.unwrap_or_default();
            let text = |field: &str| -> Result<Option<String>, (String, String)> {
                match target.get(field) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err((
                        at(&format!(".spec.target.{field}")),
                        "must be a string".into(),
                    )),
                }
            };
            let (user, role) = (text("user")?, text("role")?);
            if let Some(unknown) = target.keys().find(|k| !TARGET_FIELDS.contains(&k.as_str())) {
                return Err((
                    at(&format!(".spec.target.{unknown}")),
                    "not a Teleport lock target".into(),
                ));
            }
            let has_target = target
                .values()
                .any(|v| !v.is_null() && v.as_str() != Some(""));
            if !has_target {
                return Err((at(".spec.target"), "names no target".into()));
            }
            let expires = spec
                .expires
                .map(|text| {
                    OffsetDateTime::parse(&text, &Rfc3339)
                        .map(|t| t.unix_timestamp())
                        .map_err(|e| (at(".spec.expires"), format!("not RFC 3339: {e}")))
                })
                .transpose()?;
            if user.is_none() && role.is_none() {
                set.ignored.push(name);
                continue;
            }
            set.locks.push(Lock {
                name,
                user,
                role,
                message: spec.message.filter(|m| !m.is_empty()),
                expires,
            });
        }
        Ok(set)
    }

    /// Locks whose only targets are ones an app certificate does not carry (never in force).
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// Number of locks that can apply.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// True if no lock can apply.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// The first lock in force at `now` for `user` holding `roles`: its name (for the audit
    /// line) and the refusal naming its target and message (Teleport's wording).
    pub fn check(&self, user: &str, roles: &[String], now: i64) -> Result<(), (String, Refusal)> {
        for lock in &self.locks {
            if lock.expires.is_some_and(|expires| now >= expires) {
                continue;
            }
            let target = if lock.user.as_deref() == Some(user) {
                format!("User:{user:?}")
            } else if let Some(role) = lock.role.as_ref().filter(|r| roles.contains(r)) {
                format!("Role:{role:?}")
            } else {
                continue;
            };
            let mut message = format!("lock {:?} targeting {target} is in force", lock.name);
            if let Some(text) = &lock.message {
                message.push_str(": ");
                message.push_str(text);
            }
            return Err((lock.name.clone(), Refusal::Locked(message)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str, target: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({"target": target});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::json!({"kind": "lock", "version": "v2", "metadata": {"name": name}, "spec": spec})
    }

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn user_and_role_locks_refuse_with_teleports_message() {
        let set = LockSet::parse(vec![
            lock(
                "l1",
                serde_json::json!({"user": "alice"}),
                serde_json::json!({"message": "offboarding"}),
            ),
            lock(
                "l2",
                serde_json::json!({"role": "contractor"}),
                serde_json::json!({}),
            ),
        ])
        .unwrap();
        let (name, err) = set.check("alice", &roles(&["dev"]), 0).unwrap_err();
        assert_eq!(name, "l1");
        assert_eq!(err.code(), "Locked");
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.message(),
            "lock \"l1\" targeting User:\"alice\" is in force: offboarding"
        );
        let (_, err) = set
            .check("bob", &roles(&["dev", "contractor"]), 0)
            .unwrap_err();
        assert!(
            err.message().contains("Role:\"contractor\""),
            "{}",
            err.message()
        );
        set.check("bob", &roles(&["dev"]), 0).unwrap();
        // Names compare exactly, as in Teleport.
        set.check("Alice", &roles(&["Contractor"]), 0).unwrap();
    }

    #[test]
    fn a_lock_ends_when_it_expires() {
        let set = LockSet::parse(vec![lock(
            "ttl",
            serde_json::json!({"user": "alice"}),
            serde_json::json!({"expires": "2026-12-02T10:00:00Z"}),
        )])
        .unwrap();
        let expires = 1_796_205_600; // 2026-12-02T10:00:00Z
        assert!(set.check("alice", &[], expires - 1).is_err());
        set.check("alice", &[], expires).unwrap();
    }

    #[test]
    fn targets_an_app_certificate_does_not_carry_are_ignored_and_bad_locks_refused() {
        let set = LockSet::parse(vec![
            lock(
                "ssh",
                serde_json::json!({"login": "root"}),
                serde_json::json!({}),
            ),
            lock(
                "both",
                serde_json::json!({"login": "root", "user": "alice"}),
                serde_json::json!({}),
            ),
        ])
        .unwrap();
        assert_eq!(set.ignored(), ["ssh"]);
        assert_eq!(set.len(), 1);
        for (bad, field) in [
            (
                serde_json::json!({"kind": "role", "metadata": {"name": "x"}}),
                "locks[0].kind",
            ),
            (
                lock("", serde_json::json!({"user": "a"}), serde_json::json!({})),
                "locks[0].metadata.name",
            ),
            (
                lock("x", serde_json::json!({}), serde_json::json!({})),
                "locks[0].spec.target",
            ),
            (
                lock("x", serde_json::json!({"user": ""}), serde_json::json!({})),
                "locks[0].spec.target",
            ),
            (
                lock("x", serde_json::json!({"usr": "a"}), serde_json::json!({})),
                "locks[0].spec.target.usr",
            ),
            (
                lock("x", serde_json::json!({"user": 1}), serde_json::json!({})),
                "locks[0].spec.target.user",
            ),
            (
                lock(
                    "x",
                    serde_json::json!({"user": "a"}),
                    serde_json::json!({"expires": "tomorrow"}),
                ),
                "locks[0].spec.expires",
            ),
        ] {
            assert_eq!(LockSet::parse(vec![bad]).unwrap_err().0, field);
        }
    }
}
