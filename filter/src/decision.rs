//! The per-request decision, from request headers to "forward with a token for (identity,
//! resource) to this host" or a refusal. Pure: the proxy-wasm glue feeds it headers and the clock.
//!
//! Order of checks: the request line (method, origin-form target), certificate (identity,
//! validity, selected identity), `Authorization` shape, RBAC, target endpoint, and last the JWT
//! signature (the expensive step) and its claims.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::audience;
use crate::config::Config;
use crate::endpoint::printable;
use crate::error::Refusal;
use crate::headers;
pub use crate::headers::RequestView;
use crate::identity::{self, AppIdentity};
use crate::jwt::{self, Claims};
use crate::policy::IdentityId;

/// A request allowed to go upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The Azure host, normalised: the new `:authority`.
    pub target: String,
    /// The managed identity whose token is injected.
    pub identity: IdentityId,
    /// The audience of the token; `None` for unauthenticated forwarding (no token injected).
    pub resource: Option<String>,
}

/// What the audit line says about a request. Never holds tokens or keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFields {
    /// Certificate CN, once known.
    pub user: Option<String>,
    /// Certificate O attributes, once known.
    pub roles: Vec<String>,
    /// Selected identity, once known.
    pub identity: Option<String>,
    /// Target host as requested (sanitised), once known.
    pub target: Option<String>,
    /// `resource` claim, once verified.
    pub resource: Option<String>,
    /// `:method`.
    pub method: String,
    /// `:path` without its query (sanitised).
    pub path: String,
    /// The Teleport lock that refused the request, if one did.
    pub lock: Option<String>,
    /// When the request reached the filter, Unix ms (not written: `duration_ms` is).
    pub started_ms: i64,
    /// Whether the injected token came from the cache (`None`: no token injected).
    pub token_cached: Option<bool>,
    /// Azure's answer, once it is known (forwarded requests only).
    pub upstream: Option<UpstreamFields>,
}

/// What Azure answered a forwarded request: what ties the audit line to Azure's own logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamFields {
    /// The response status.
    pub status: u16,
    /// `x-ms-request-id` (sanitised).
    pub request_id: Option<String>,
    /// `x-ms-correlation-request-id` (sanitised).
    pub correlation_id: Option<String>,
    /// From the request reaching the filter to the response headers, ms.
    pub duration_ms: i64,
}

impl UpstreamFields {
    /// Azure's answer from its `:status` and request-id headers, received at `now_ms`. Header
    /// values are upstream-controlled bytes: made printable ASCII and bounded ([`printable`]).
    pub fn from_response(
        status: Option<&[u8]>,
        request_id: Option<&[u8]>,
        correlation_id: Option<&[u8]>,
        started_ms: i64,
        now_ms: i64,
    ) -> Self {
        let id = |value: Option<&[u8]>| value.map(|v| printable(&String::from_utf8_lossy(v)));
        Self {
            status: status
                .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
                .unwrap_or(0),
            request_id: id(request_id),
            correlation_id: id(correlation_id),
            duration_ms: now_ms.saturating_sub(started_ms).max(0),
        }
    }
}

impl AuditFields {
    /// The fields known before any check: the method and the path without its query (SAS
    /// signatures live there), both made printable.
    pub fn for_request(method: &str, path: &str) -> Self {
        Self {
            method: printable(method),
            path: printable(path.split('?').next().unwrap_or_default()),
            ..Default::default()
        }
    }

    /// One JSON audit line for the final decision.
    pub fn line(&self, outcome: Result<(), &Refusal>) -> String {
        let (decision, code, status) = match outcome {
            Ok(()) => ("allow", "Allowed", 0),
            Err(refusal @ Refusal::BearerChallenge { .. }) => {
                ("challenge", refusal.code(), refusal.status())
            }
            Err(refusal) => ("deny", refusal.code(), refusal.status()),
        };
        let upstream = self.upstream.as_ref();
        let line = AuditLine {
            code,
            decision,
            duration_ms: upstream.map(|u| u.duration_ms),
            event: "azgate.request",
            identity: self.identity.as_deref(),
            lock: self.lock.as_deref(),
            method: &self.method,
            path: &self.path,
            resource: self.resource.as_deref(),
            roles: &self.roles,
            // Azure's status once known, else the refusal's (none for a request not answered).
            status: upstream
                .map(|u| u32::from(u.status))
                .or((status != 0).then_some(status)),
            target: self.target.as_deref(),
            token_cached: self.token_cached,
            upstream_status: upstream.map(|u| u.status),
            user: self.user.as_deref(),
            x_ms_correlation_request_id: upstream.map(|u| u.correlation_id.as_deref()),
            x_ms_request_id: upstream.map(|u| u.request_id.as_deref()),
        };
        // Serialising borrowed strings, integers and booleans cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// The audit line as written: serialised straight from borrowed fields (no intermediate JSON
/// value: this runs for every request). Fields are in alphabetical order, the order consumers
/// of earlier lines saw; `None` of an optional field leaves the key out, `null` means "not
/// known" for the fields every line carries.
#[derive(serde::Serialize)]
struct AuditLine<'a> {
    code: &'a str,
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<i64>,
    event: &'a str,
    identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    resource: Option<&'a str>,
    roles: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u32>,
    target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_cached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<u16>,
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x_ms_correlation_request_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x_ms_request_id: Option<Option<&'a str>>,
}

/// Remembers parsed certificates (by their exact XFCC header value, so a hit skips splitting
/// and URL-decoding it, the costliest step of a cached request) and (JWT, certificate) pairs that
/// verified, so a client's reused certificate and token are not parsed and verified on every
/// request. Bounded, oldest evicted first. Validity periods and time claims are re-checked on
/// every use; only successes are remembered.
#[derive(Debug, Default)]
pub struct VerificationCache {
    capacity: usize,
    /// Token → (fingerprint of the certificate it verified under, its claims). Keyed by the
    /// whole token, compared in full: no hash stands in for it.
    claims: HashMap<Rc<str>, ([u8; 32], Claims), EdgeHashing>,
    order: VecDeque<Rc<str>>,
    certificates: HashMap<String, Rc<AppIdentity>, EdgeHashing>,
    certificate_order: VecDeque<String>,
}

impl VerificationCache {
    /// A cache holding at most `capacity` pairs (0 disables it).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Default::default()
        }
    }

    fn verify(&mut self, token: &str, cert: &AppIdentity) -> Result<Claims, Refusal> {
        if let Some((fingerprint, claims)) = self.claims.get(token)
            && *fingerprint == cert.fingerprint
        {
            return Ok(claims.clone());
        }
        let claims = jwt::verify(token, &cert.public_key)?;
        if self.capacity > 0 {
            let token: Rc<str> = Rc::from(token);
            let previous = self
                .claims
                .insert(token.clone(), (cert.fingerprint, claims.clone()));
            // A token seen before under another certificate keeps its place in the order.
            if previous.is_none() {
                if self.order.len() >= self.capacity
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.claims.remove(&oldest);
                }
                self.order.push_back(token);
            }
        }
        Ok(claims)
    }

    /// The client certificate the XFCC header describes. Parsing is deterministic, so a header
    /// value that parsed before maps to the same certificate.
    fn certificate(&mut self, xfcc: &[&str]) -> Result<Rc<AppIdentity>, Refusal> {
        if let [value] = xfcc
            && let Some(cert) = self.certificates.get(*value)
        {
            return Ok(cert.clone());
        }
        let cert = Rc::new(identity::certificate_from_xfcc(xfcc)?);
        if self.capacity > 0
            && let [value] = xfcc
        {
            if self.certificate_order.len() >= self.capacity
                && let Some(oldest) = self.certificate_order.pop_front()
            {
                self.certificates.remove(&oldest);
            }
            self.certificate_order.push_back(value.to_string());
            self.certificates.insert(value.to_string(), cert.clone());
        }
        Ok(cert)
    }

    /// Pairs currently remembered.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// True if nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

/// Bytes hashed at each end of a [`VerificationCache`] key.
const HASHED_EDGE: usize = 128;

/// Hashing for [`VerificationCache`]'s keys: a key's length and its first and last
/// [`HASHED_EDGE`] bytes, through the standard library's keyed SipHash. The keys are a ~3 KB
/// XFCC value and a ~1 KB token, and hashing all of them was the costliest step of a lookup.
/// Lookups still compare keys in full, so this only changes how keys spread over buckets; and
/// keys that share both edges are rare and costly to make (an XFCC value is the front's, and
/// a token ends in its signature), while only verified pairs are ever inserted, at most
/// `capacity` of them.
#[derive(Clone, Debug, Default)]
struct EdgeHashing(std::hash::RandomState);

impl std::hash::BuildHasher for EdgeHashing {
    type Hasher = EdgeHasher;

    fn build_hasher(&self) -> EdgeHasher {
        EdgeHasher(self.0.build_hasher())
    }
}

/// See [`EdgeHashing`].
struct EdgeHasher(std::hash::DefaultHasher);

impl std::hash::Hasher for EdgeHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write_usize(bytes.len());
        if bytes.len() <= 2 * HASHED_EDGE {
            self.0.write(bytes);
        } else {
            self.0.write(&bytes[..HASHED_EDGE]);
            self.0.write(&bytes[bytes.len() - HASHED_EDGE..]);
        }
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Decides a request from the host's header pairs (see [`headers::read`]).
pub fn decide_header_map(
    pairs: &[(String, Vec<u8>)],
    config: &Config,
    now: i64,
    verified: &mut VerificationCache,
) -> (AuditFields, Result<Grant, Refusal>) {
    match headers::read(pairs) {
        Ok(view) => decide(&view, config, now, verified),
        Err(refusal) => {
            let (method, path) = headers::lossy_method_and_path(pairs);
            (AuditFields::for_request(&method, &path), Err(refusal))
        }
    }
}

/// Decides a request at Unix time `now`. The audit fields are filled as far as the decision got.
pub fn decide(
    view: &RequestView<'_>,
    config: &Config,
    now: i64,
    verified: &mut VerificationCache,
) -> (AuditFields, Result<Grant, Refusal>) {
    let mut audit = AuditFields::for_request(view.method, view.path);
    let result = decide_into(view, config, now, verified, &mut audit);
    (audit, result)
}

fn decide_into(
    view: &RequestView<'_>,
    config: &Config,
    now: i64,
    verified: &mut VerificationCache,
    audit: &mut AuditFields,
) -> Result<Grant, Refusal> {
    check_request_line(view.method, view.path)?;
    let cert = verified.certificate(&view.xfcc)?;
    audit.user = Some(cert.user.clone());
    audit.roles = cert.roles.clone();
    audit.identity = cert.selected_identity.clone();
    if let Some(host) = view.forwarded_host.first() {
        audit.target = Some(printable(host));
    }
    cert.check_validity(now, config.clock_skew_s)?;
    cert.check_route(&config.certificate)?;
    // Before the token's verification (cached or not) is looked at: a lock ends access at once.
    config
        .locks
        .check(&cert.user, &cert.roles, now)
        .map_err(|(lock, refusal)| {
            audit.lock = Some(printable(&lock));
            refusal
        })?;
    let selected = cert.selected_identity.as_deref().ok_or_else(|| {
        Refusal::NoIdentitySelected(
            "the certificate selects no Azure identity; log in with --azure-identity".into(),
        )
    })?;
    let selected = IdentityId::parse(selected).map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the selected Azure identity is invalid: {e}"))
    })?;

    // A token-less request to a challenging data plane goes through RBAC and the endpoint
    // check, then gets the service's challenge (below); any other one is refused here.
    let mut challenge = None;
    let bearer = match view.authorization.as_slice() {
        [] if config.allow_unauthenticated => None,
        [] => match config
            .endpoints
            .target(&view.forwarded_host)
            .ok()
            .and_then(|host| audience::data_plane(&host))
        {
            Some(plane) => {
                challenge = Some(plane);
                None
            }
            None => {
                return Err(Refusal::MissingToken(
                    "the request has no Authorization header; azgate requires a token signed by \
                     your app certificate"
                        .into(),
                ));
            }
        },
        [one] => Some(jwt::bearer_token(one, config.max_token_bytes)?),
        _ => {
            return Err(Refusal::InvalidAuthorizationHeader(
                "more than one Authorization header".into(),
            ));
        }
    };

    config.roles.check(
        &cert.roles,
        &cert.traits,
        &selected,
        &cert.allowed_identities,
    )?;
    let target = config.endpoints.target(&view.forwarded_host)?;
    audit.target = Some(target.clone());
    if let Some(plane) = challenge {
        return Err(Refusal::BearerChallenge {
            message: format!(
                "the request has no Authorization header; get a token for {} and send it",
                plane.resource
            ),
            challenge: plane.challenge(&config.tenant_id),
        });
    }

    let resource = match bearer {
        None => None,
        Some(token) => {
            let claims = verified.verify(token, &cert)?;
            claims.check_time(now, config.clock_skew_s)?;
            jwt::check_resource(&claims.resource)?;
            audit.resource = Some(claims.resource.clone());
            Some(claims.resource)
        }
    };
    Ok(Grant {
        target,
        identity: selected,
        resource,
    })
}

/// Refuses what cannot be forwarded as a plain Azure request: a tunnel (`CONNECT`), a method
/// that echoes the request with its injected token (`TRACE`), and targets that are not a path
/// (`OPTIONS *`; absolute-form targets reach the filter already split by the host).
fn check_request_line(method: &str, path: &str) -> Result<(), Refusal> {
    if method.eq_ignore_ascii_case("CONNECT") || method.eq_ignore_ascii_case("TRACE") {
        return Err(Refusal::MethodNotAllowed(format!(
            "azgate does not forward {} requests",
            printable(method)
        )));
    }
    if !path.starts_with('/') {
        return Err(Refusal::InvalidRequestTarget(
            "the request target must be a path starting with '/'".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_trace_and_non_path_targets_are_refused_before_anything_else() {
        let config = Config::default();
        for (method, path, code) in [
            ("CONNECT", "", "MethodNotAllowed"),
            ("connect", "management.azure.com:443", "MethodNotAllowed"),
            ("TRACE", "/", "MethodNotAllowed"),
            ("OPTIONS", "*", "InvalidRequestTarget"),
            (
                "GET",
                "https://management.azure.com/",
                "InvalidRequestTarget",
            ),
            ("GET", "", "InvalidRequestTarget"),
        ] {
            let view = RequestView {
                method,
                path,
                ..Default::default()
            };
            let (_, result) = decide(&view, &config, 0, &mut VerificationCache::new(4));
            assert_eq!(result.unwrap_err().code(), code, "{method} {path}");
        }
    }

    #[test]
    fn missing_certificate_is_refused_first() {
        let config = Config::default();
        let view = RequestView {
            authorization: vec!["Bearer x"],
            forwarded_host: vec!["management.azure.com"],
            method: "GET",
            path: "/subscriptions?api-version=2022-01-01",
            ..Default::default()
        };
        let (audit, result) = decide(&view, &config, 0, &mut VerificationCache::new(4));
        assert_eq!(result.unwrap_err().code(), "MissingClientCertificate");
        assert_eq!(audit.path, "/subscriptions");
        assert_eq!(audit.user, None);
    }

    #[test]
    fn audit_fields_of_an_unreadable_request_are_printable() {
        let pairs = vec![
            (":method".to_string(), b"G\xffT".to_vec()),
            (":path".to_string(), b"/a\x01b?secret".to_vec()),
        ];
        let (audit, result) = decide_header_map(
            &pairs,
            &Config::default(),
            0,
            &mut VerificationCache::new(4),
        );
        assert_eq!(result.unwrap_err().code(), "InvalidHeader");
        assert!(audit.method.is_ascii());
        assert_eq!(audit.path, "/a?b");
    }

    #[test]
    fn audit_line_is_json_without_secrets() {
        let audit = AuditFields {
            user: Some("alice".into()),
            method: "GET".into(),
            path: "/x".into(),
            ..Default::default()
        };
        let refusal = Refusal::IdentityNotAllowed("no".into());
        let line: serde_json::Value = serde_json::from_str(&audit.line(Err(&refusal))).unwrap();
        assert_eq!(line["decision"], "deny");
        assert_eq!(line["code"], "IdentityNotAllowed");
        assert_eq!(line["status"], 403);
        assert_eq!(line["user"], "alice");
        let line: serde_json::Value = serde_json::from_str(&audit.line(Ok(()))).unwrap();
        assert_eq!(line["decision"], "allow");
    }

    fn identity(key: &p256::ecdsa::SigningKey, fingerprint: u8) -> AppIdentity {
        AppIdentity {
            user: "alice".into(),
            roles: vec![],
            selected_identity: None,
            allowed_identities: vec![],
            traits: Default::default(),
            usage: vec![],
            app_name: None,
            app_cluster: None,
            not_before: 0,
            not_after: i64::MAX,
            public_key: crate::jwt::tests::public(key),
            fingerprint: [fingerprint; 32],
        }
    }

    #[test]
    fn the_audit_line_of_a_forwarded_request_carries_azures_answer() {
        let mut audit = AuditFields {
            token_cached: Some(true),
            ..AuditFields::for_request("GET", "/x?sig=secret")
        };
        let long = vec![b'a'; 4096];
        audit.upstream = Some(UpstreamFields::from_response(
            Some(b"401"),
            Some(b"id-1\x01\xff"),
            Some(&long),
            1_000,
            1_250,
        ));
        let line: serde_json::Value = serde_json::from_str(&audit.line(Ok(()))).unwrap();
        assert_eq!(line["decision"], "allow");
        assert_eq!(line["upstream_status"], 401);
        assert_eq!(line["status"], 401);
        assert_eq!(line["duration_ms"], 250);
        assert_eq!(line["token_cached"], true);
        assert_eq!(line["path"], "/x");
        let id = line["x_ms_request_id"].as_str().unwrap();
        assert!(
            id.starts_with("id-1") && id.chars().all(|c| !c.is_control()),
            "{id}"
        );
        assert_eq!(
            line["x_ms_correlation_request_id"].as_str().unwrap().len(),
            103
        );
        // No status at all: 0, never a panic.
        let none = UpstreamFields::from_response(None, None, None, 5, 1);
        assert_eq!((none.status, none.duration_ms), (0, 0));
    }

    #[test]
    fn the_audit_line_names_the_lock_that_refused() {
        let audit = AuditFields {
            lock: Some("offboarding-alice".into()),
            ..AuditFields::for_request("GET", "/x")
        };
        let refusal = Refusal::Locked("lock in force".into());
        let line: serde_json::Value = serde_json::from_str(&audit.line(Err(&refusal))).unwrap();
        assert_eq!(line["code"], "Locked");
        assert_eq!(line["lock"], "offboarding-alice");
        let line: serde_json::Value =
            serde_json::from_str(&AuditFields::default().line(Ok(()))).unwrap();
        assert!(line.get("lock").is_none());
    }

    #[test]
    fn a_verified_token_is_remembered_only_for_its_certificate() {
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other_key = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let token = crate::jwt::tests::es256(
            &key,
            serde_json::json!({"alg": "ES256", "typ": "JWT"}),
            serde_json::json!({"resource": "https://management.azure.com/"}),
        );
        let mut cache = VerificationCache::new(2);
        let signer = identity(&key, 1);
        assert!(cache.verify(&token, &signer).is_ok());
        assert_eq!(cache.len(), 1);
        // Same token, same certificate: from the cache.
        assert!(cache.verify(&token, &signer).is_ok());
        assert_eq!(cache.len(), 1);
        // Same token presented with another certificate: verified again, and refused.
        let impostor = identity(&other_key, 2);
        assert_eq!(
            cache.verify(&token, &impostor).unwrap_err().code(),
            "InvalidToken"
        );
    }

    #[test]
    fn keys_that_share_their_hashed_edges_stay_apart() {
        use std::hash::{BuildHasher, Hasher};
        let hashing = EdgeHashing::default();
        let hash = |bytes: &[u8]| {
            let mut hasher = hashing.build_hasher();
            hasher.write(bytes);
            hasher.finish()
        };
        let edge = "e".repeat(HASHED_EDGE);
        let (a, b) = (
            format!("{edge}-middle-a-{edge}"),
            format!("{edge}-middle-b-{edge}"),
        );
        // Same edges and length: one hash, but two keys (equality is the whole key).
        assert_eq!(hash(a.as_bytes()), hash(b.as_bytes()));
        let mut map: HashMap<String, u8, EdgeHashing> = HashMap::default();
        map.insert(a.clone(), 1);
        map.insert(b.clone(), 2);
        assert_eq!((map.get(&a), map.get(&b)), (Some(&1), Some(&2)));
        assert_eq!(map.get(&format!("{edge}-middle-c-{edge}")), None);
        // Anything differing at an edge or in length hashes apart; short keys hash whole.
        assert_ne!(hash(a.as_bytes()), hash(format!("x{a}").as_bytes()));
        assert_ne!(hash(a.as_bytes()), hash(format!("{a}x").as_bytes()));
        assert_ne!(hash(b"short-a"), hash(b"short-b"));
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_oldest() {
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let signer = identity(&key, 1);
        let mut cache = VerificationCache::new(2);
        let tokens: Vec<String> = (0..3)
            .map(|i| {
                crate::jwt::tests::es256(
                    &key,
                    serde_json::json!({"alg": "ES256"}),
                    serde_json::json!({"resource": format!("api://{i}")}),
                )
            })
            .collect();
        for token in &tokens {
            cache.verify(token, &signer).unwrap();
        }
        assert_eq!(cache.len(), 2);
        assert!(!cache.claims.contains_key(tokens[0].as_str()));
        assert!(cache.claims.contains_key(tokens[2].as_str()));
    }

    /// The audit line's exact bytes: keys in alphabetical order, `null` for what is not known,
    /// optional keys only when they apply; Azure's status replaces the refusal's.
    #[test]
    fn audit_lines_have_a_fixed_shape() {
        let refused = AuditFields {
            user: Some("alice".into()),
            roles: vec!["azure-reader".into(), "dev".into()],
            method: "GET".into(),
            path: "/subscriptions".into(),
            lock: Some("incident-42".into()),
            ..Default::default()
        };
        let refusal = Refusal::Locked("locked".into());
        assert_eq!(
            refused.line(Err(&refusal)),
            format!(
                r#"{{"code":"{}","decision":"deny","event":"azgate.request","identity":null,"lock":"incident-42","method":"GET","path":"/subscriptions","resource":null,"roles":["azure-reader","dev"],"status":{},"target":null,"user":"alice"}}"#,
                refusal.code(),
                refusal.status()
            )
        );
        let forwarded = AuditFields {
            user: Some("bob \"q\"".into()),
            identity: Some("/subscriptions/s/x".into()),
            target: Some("management.azure.com".into()),
            resource: Some("https://management.azure.com/".into()),
            method: "PUT".into(),
            path: "/p".into(),
            token_cached: Some(true),
            upstream: Some(UpstreamFields {
                status: 201,
                request_id: Some("r-1".into()),
                correlation_id: None,
                duration_ms: 7,
            }),
            ..Default::default()
        };
        assert_eq!(
            forwarded.line(Ok(())),
            r#"{"code":"Allowed","decision":"allow","duration_ms":7,"event":"azgate.request","identity":"/subscriptions/s/x","method":"PUT","path":"/p","resource":"https://management.azure.com/","roles":[],"status":201,"target":"management.azure.com","token_cached":true,"upstream_status":201,"user":"bob \"q\"","x_ms_correlation_request_id":null,"x_ms_request_id":"r-1"}"#
        );
    }
}
