//! Per-VM token broker: pauses requests while their token is fetched, coalesces them per
//! (identity, resource), and resumes or refuses them when the token (or failure) arrives.
//!
//! Requests of this VM waiting for the same key share one call-out. Requests whose key another
//! worker is fetching poll shared data on the tick. The cache rules themselves (claims, CAS,
//! expiry) are [`crate::token_cache`]; this module only does the proxy-wasm bookkeeping.
//!
//! The proxy-wasm Rust SDK delivers a call-out's response to the context that dispatched it and
//! drops it if that context is gone. So when a request that owns a fetch goes away, the fetch is
//! re-dispatched from the root context on the next tick; otherwise other workers would wait for
//! a response nobody receives until the claim goes stale.
//!
//! It also ends every request, in one place: a refused request gets its audit line and its
//! Azure-style answer at once ([`refuse`]); a forwarded one has its headers rewritten
//! ([`rewrite`]) and its audit line held until the response is known and the stream ends
//! ([`Broker::on_response_headers`], [`Broker::on_stream_end`]).
//!
//! Every host call goes through [`Host`], so this state machine runs natively in the unit tests
//! (`broker/tests.rs`) on a fake host with a fake clock.

use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm::types::{Action, LogLevel};

use crate::config::Config;
use crate::decision::{AuditFields, Grant, UpstreamFields};
use crate::error::Refusal;
use crate::host::Host;
use crate::imds::{self, AccessToken};
use crate::token_cache::{self, Acquire, Poll, Rules};

/// Largest token-service answer read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// A paused request: how it will end, and by when.
struct Waiter {
    ending: Ending,
    deadline_ms: i64,
}

/// Where the fetch for a key stands, seen from this VM.
enum Phase {
    /// This VM dispatched a call-out from context `owner` at `started_ms`.
    Fetching { owner: u32, started_ms: i64 },
    /// The owner went away before the answer; re-dispatch from the root on the next tick.
    Orphaned,
    /// This VM wrote the first claim of the key at `since_ms`; confirm it after one interval.
    Settling { since_ms: i64 },
    /// Another worker is fetching; poll shared data. Waiting since `since_ms`.
    Waiting { since_ms: i64 },
}

struct Pending {
    identity: String,
    resource: String,
    phase: Phase,
    waiters: Vec<Waiter>,
}

/// A request that went upstream, until its stream ends.
struct Forwarded {
    audit: AuditFields,
    /// (cache key, token) injected: revoked if Azure answers with a claims challenge.
    injected: Option<(String, String)>,
}

/// Whether a request is finished inside its own `on_http_request_headers` (the returned
/// [`Action`] continues or stops it) or later, from another callback (switch to it first, then
/// resume it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    Inline,
    Deferred,
}

/// A request past the decision, until its token step is over.
struct Ending {
    context_id: u32,
    /// The Azure host it goes to (the new `:authority`).
    target: String,
    /// The cache key of the token it asked for (none for unauthenticated forwarding).
    key: Option<String>,
    audit: AuditFields,
}

/// The token a request goes upstream with, and whether it came from the shared cache.
type Injected<'a> = Option<(&'a AccessToken, bool)>;

/// The per-VM broker. A VM is single-threaded; this is all of its request bookkeeping.
pub struct Broker {
    root_id: u32,
    rules: Rules,
    nonce: u64,
    pending: HashMap<String, Pending>,
    calls: HashMap<u32, String>,
    ticking: bool,
    /// Audit records of forwarded requests, by context id, until the response is known: the
    /// line is written at the end of the stream with Azure's status and request ids.
    forwarded: HashMap<u32, Forwarded>,
}

impl Broker {
    /// A broker for the VM whose root context is `root_id`, configured at `now_ms`.
    pub fn new(config: &Config, root_id: u32, now_ms: i64) -> Self {
        // Unique per VM: start time and root id. Nonces only need to differ between workers.
        let nonce = (now_ms as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(root_id) << 48;
        Self {
            root_id,
            rules: Rules {
                expiry_margin_s: config.token_expiry_margin_s,
                lock_ttl_ms: lock_ttl_ms(config),
            },
            nonce,
            pending: HashMap::new(),
            calls: HashMap::new(),
            ticking: false,
            forwarded: HashMap::new(),
        }
    }

    /// Sends the authorised request of context `context_id` (the effective context) on its
    /// way: at once without a token (unauthenticated forwarding) or on a cache hit, otherwise by
    /// pausing it until the token arrives.
    pub fn on_authorised<H: Host>(
        &mut self,
        host: &H,
        config: &Config,
        context_id: u32,
        grant: Grant,
        audit: AuditFields,
    ) -> Action {
        let Grant {
            target,
            identity,
            resource,
        } = grant;
        let Some(resource) = resource else {
            let ending = Ending {
                context_id,
                target,
                key: None,
                audit,
            };
            return self.finish(host, ending, Ok(None), Resume::Inline);
        };
        let now_ms = host.now_ms();
        let key = token_cache::cache_key(identity.folded(), &resource);
        let waiter = Waiter {
            ending: Ending {
                context_id,
                target,
                key: Some(key.clone()),
                audit,
            },
            deadline_ms: now_ms + waiter_budget_ms(config),
        };
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.waiters.push(waiter);
            return Action::Pause;
        }
        let identity = identity.as_str().to_string();
        let phase = match self.rules.acquire(host, &key, now_ms, self.nonce) {
            Ok(Acquire::Hit(token)) => {
                return self.finish(
                    host,
                    waiter.ending,
                    Ok(Some((&token, true))),
                    Resume::Inline,
                );
            }
            Ok(Acquire::Fetch) => match self.dispatch(host, config, &key, &identity, &resource) {
                Ok(()) => Phase::Fetching {
                    owner: context_id,
                    started_ms: now_ms,
                },
                Err(refusal) => {
                    self.publish(host, &key, &Err(refusal.clone()), now_ms);
                    return self.finish(host, waiter.ending, Err(&refusal), Resume::Inline);
                }
            },
            Ok(Acquire::Settle) => Phase::Settling { since_ms: now_ms },
            Ok(Acquire::Wait) => Phase::Waiting { since_ms: now_ms },
            Err(refusal) => return self.finish(host, waiter.ending, Err(&refusal), Resume::Inline),
        };
        self.pending.insert(
            key,
            Pending {
                identity,
                resource,
                phase,
                waiters: vec![waiter],
            },
        );
        self.ensure_ticking(host, config);
        Action::Pause
    }

    /// A call-out answered (or failed): publish the outcome and release this VM's waiters.
    pub fn on_call_response<H: Host>(
        &mut self,
        host: &H,
        call: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        let Some(key) = self.calls.remove(&call) else {
            return;
        };
        let now_ms = host.now_ms();
        let outcome = read_token_response(host, num_headers, body_size, now_ms / 1000);
        self.publish(host, &key, &outcome, now_ms);
        if let Some(pending) = self.pending.remove(&key) {
            log_fetch(host, &pending, &outcome);
            let outcome = outcome.as_ref().map(|token| Some((token, false)));
            for waiter in pending.waiters {
                self.finish(host, waiter.ending, outcome, Resume::Deferred);
            }
        }
        self.stop_ticking_if_idle(host);
    }

    /// Polls other workers' fetches, confirms first claims, re-dispatches orphaned fetches and
    /// times out waiters past their deadline.
    pub fn on_tick<H: Host>(&mut self, host: &H, config: &Config) {
        let now_ms = host.now_ms();
        let keys: Vec<String> = self.pending.keys().cloned().collect();
        for key in keys {
            let Some(mut pending) = self.pending.remove(&key) else {
                continue;
            };
            let (expired, waiting): (Vec<Waiter>, Vec<Waiter>) = pending
                .waiters
                .drain(..)
                .partition(|w| now_ms >= w.deadline_ms);
            pending.waiters = waiting;
            let timeout = Refusal::TokenServiceTimeout(
                "timed out waiting for a managed identity token".into(),
            );
            for waiter in expired {
                self.finish(host, waiter.ending, Err(&timeout), Resume::Deferred);
            }
            let polled = match pending.phase {
                Phase::Fetching { started_ms, .. }
                    if now_ms - started_ms > self.rules.lock_ttl_ms =>
                {
                    // The host never answered (it must, by the call timeout): fetch again.
                    Ok(Poll::Fetch)
                }
                Phase::Fetching { .. } => Ok(Poll::Pending),
                Phase::Orphaned => Ok(Poll::Fetch),
                Phase::Settling { since_ms } => {
                    if now_ms - since_ms < config.token_wait_poll_ms as i64 {
                        Ok(Poll::Pending)
                    } else {
                        self.rules.confirm(host, &key, self.nonce, now_ms)
                    }
                }
                Phase::Waiting { since_ms } => {
                    self.rules.poll(host, &key, since_ms, now_ms, self.nonce)
                }
            };
            match polled {
                Ok(Poll::Pending) => {
                    if let Phase::Settling { since_ms } = pending.phase
                        && now_ms - since_ms >= config.token_wait_poll_ms as i64
                    {
                        pending.phase = Phase::Waiting { since_ms };
                    }
                    if !pending.waiters.is_empty()
                        || matches!(pending.phase, Phase::Fetching { .. })
                    {
                        self.pending.insert(key, pending);
                    }
                }
                Ok(Poll::Ready(token)) => {
                    // Fetched by another worker: from the shared cache.
                    for waiter in pending.waiters {
                        self.finish(
                            host,
                            waiter.ending,
                            Ok(Some((&token, true))),
                            Resume::Deferred,
                        );
                    }
                }
                Ok(Poll::Failed(refusal)) | Err(refusal) => {
                    for waiter in pending.waiters {
                        self.finish(host, waiter.ending, Err(&refusal), Resume::Deferred);
                    }
                }
                Ok(Poll::Settle) => {
                    pending.phase = Phase::Settling { since_ms: now_ms };
                    self.pending.insert(key, pending);
                }
                Ok(Poll::Fetch) => {
                    // Dispatched from the tick, so the answer comes to the root context.
                    self.calls.retain(|_, k| *k != key);
                    match self.dispatch(host, config, &key, &pending.identity, &pending.resource) {
                        Ok(()) => {
                            pending.phase = Phase::Fetching {
                                owner: self.root_id,
                                started_ms: now_ms,
                            };
                            self.pending.insert(key, pending);
                        }
                        Err(refusal) => {
                            self.publish(host, &key, &Err(refusal.clone()), now_ms);
                            for waiter in pending.waiters {
                                self.finish(host, waiter.ending, Err(&refusal), Resume::Deferred);
                            }
                        }
                    }
                }
            }
        }
        self.stop_ticking_if_idle(host);
    }

    /// Azure's response headers for the forwarded request of `context_id` (the effective
    /// context): noted for its audit line; a claims challenge revokes the injected token for
    /// every worker. The response goes to the client unchanged.
    pub fn on_response_headers<H: Host>(&mut self, host: &H, context_id: u32) {
        let Some(entry) = self.forwarded.get_mut(&context_id) else {
            return;
        };
        let header = |name: &str| host.response_header(name);
        let upstream = UpstreamFields::from_response(
            header(":status").as_deref(),
            header("x-ms-request-id").as_deref(),
            header("x-ms-correlation-request-id").as_deref(),
            entry.audit.started_ms,
            host.now_ms(),
        );
        let challenged = upstream.status == 401
            && header("www-authenticate").is_some_and(|v| imds::is_claims_challenge(&v));
        entry.audit.upstream = Some(upstream);
        if challenged && let Some((key, token)) = entry.injected.take() {
            self.revoke(host, &key, &token);
        }
    }

    /// The stream of `context_id` ended (`on_log`, or `on_done` if the host skips it): it no
    /// longer waits, a fetch it owned is re-dispatched by the root, and a forwarded request's
    /// audit line is written, once.
    pub fn on_stream_end<H: Host>(&mut self, host: &H, context_id: u32) {
        for pending in self.pending.values_mut() {
            pending
                .waiters
                .retain(|w| w.ending.context_id != context_id);
            if matches!(pending.phase, Phase::Fetching { owner, .. } if owner == context_id) {
                pending.phase = Phase::Orphaned;
            }
        }
        if let Some(done) = self.forwarded.remove(&context_id) {
            host.log(LogLevel::Info, &done.audit.line(Ok(())));
        }
    }

    /// Where every request that got past the decision ends: forwarded (headers rewritten, the
    /// audit line held until the stream ends) or refused (audit line and local answer now). A
    /// deferred request whose stream is gone is skipped.
    fn finish<H: Host>(
        &mut self,
        host: &H,
        ending: Ending,
        outcome: Result<Injected<'_>, &Refusal>,
        resume: Resume,
    ) -> Action {
        let Ending {
            context_id,
            target,
            key,
            mut audit,
        } = ending;
        if resume == Resume::Deferred && host.set_effective_context(context_id).is_err() {
            return Action::Pause;
        }
        let rewritten = outcome.map_err(Refusal::clone).and_then(|injected| {
            rewrite(host, &target, injected.map(|(token, _)| token)).map(|()| injected)
        });
        match rewritten {
            Ok(injected) => {
                audit.token_cached = injected.map(|(_, cached)| cached);
                let injected = key.zip(injected.map(|(token, _)| token.secret.clone()));
                self.forwarded
                    .insert(context_id, Forwarded { audit, injected });
                if resume == Resume::Inline {
                    return Action::Continue;
                }
                if let Err(status) = host.resume_request() {
                    host.log(
                        LogLevel::Error,
                        &format!("azgate: could not resume a request ({status:?})"),
                    );
                }
                Action::Continue
            }
            Err(refusal) => refuse(host, &audit, &refusal),
        }
    }

    fn dispatch<H: Host>(
        &mut self,
        host: &H,
        config: &Config,
        key: &str,
        identity: &str,
        resource: &str,
    ) -> Result<(), Refusal> {
        let refresh = self.rules.refresh_hash(host, key);
        let path = imds::token_request_path(identity, resource, refresh.as_deref());
        let call = host
            .dispatch_call(
                &config.token_cluster,
                vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", &config.token_authority),
                    ("metadata", "true"),
                ],
                Duration::from_millis(config.token_timeout_ms),
            )
            .map_err(|status| {
                Refusal::TokenUnavailable(format!(
                    "the token call-out to cluster {:?} could not be started ({status:?})",
                    config.token_cluster
                ))
            })?;
        self.calls.insert(call, key.to_string());
        Ok(())
    }

    fn publish<H: Host>(
        &self,
        host: &H,
        key: &str,
        outcome: &Result<AccessToken, Refusal>,
        now_ms: i64,
    ) {
        if let Err(refusal) = self.rules.complete(host, key, outcome, now_ms) {
            host.log(
                LogLevel::Error,
                &format!("azgate: could not publish a token outcome: {refusal}"),
            );
        }
    }

    /// Azure answered a request carrying `token` with a claims challenge: revoke it for every
    /// worker.
    fn revoke<H: Host>(&self, host: &H, key: &str, token: &str) {
        match self.rules.revoke(host, key, token) {
            Ok(revoked) => host.log(
                LogLevel::Info,
                &serde_json::json!({"event": "azgate.cae_revocation", "revoked": revoked})
                    .to_string(),
            ),
            Err(refusal) => host.log(
                LogLevel::Error,
                &format!("azgate: could not revoke a refused token: {refusal}"),
            ),
        }
    }

    fn ensure_ticking<H: Host>(&mut self, host: &H, config: &Config) {
        if !self.ticking {
            let period = Duration::from_millis(config.token_wait_poll_ms);
            self.ticking = host.set_tick_period(period).is_ok();
        }
    }

    fn stop_ticking_if_idle<H: Host>(&mut self, host: &H) {
        if self.pending.is_empty() && self.ticking {
            let _ = host.set_tick_period(Duration::ZERO);
            self.ticking = false;
        }
    }
}

/// A claim older than this is abandoned: the call-out must have answered by its timeout.
fn lock_ttl_ms(config: &Config) -> i64 {
    config.token_timeout_ms as i64 + 1_000
}

/// How long a request may stay paused for its token: a settle interval, a stale claim taken
/// over, and a full call-out.
fn waiter_budget_ms(config: &Config) -> i64 {
    2 * lock_ttl_ms(config) + config.token_wait_poll_ms as i64
}

fn read_token_response<H: Host>(
    host: &H,
    num_headers: usize,
    body_size: usize,
    now_s: i64,
) -> Result<AccessToken, Refusal> {
    if num_headers == 0 {
        // Envoy reports a reset or connect failure as a response without headers.
        return Err(Refusal::TokenUnavailable(
            "the token service could not be reached".into(),
        ));
    }
    let status = host
        .call_response_header(":status")
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        .ok_or_else(|| {
            Refusal::InvalidTokenServiceResponse("the token service answer has no status".into())
        })?;
    if body_size > MAX_TOKEN_RESPONSE_BYTES {
        return Err(Refusal::InvalidTokenServiceResponse(
            "the token service answer is too large".into(),
        ));
    }
    imds::parse_token_response(status, &host.call_response_body(body_size), now_s)
}

fn log_fetch<H: Host>(host: &H, pending: &Pending, outcome: &Result<AccessToken, Refusal>) {
    let line = serde_json::json!({
        "event": "azgate.token_fetch",
        "identity": pending.identity,
        "resource": pending.resource,
        "outcome": outcome.as_ref().map(|_| "ok").unwrap_or_else(|r| r.code()),
        "expires_on": outcome.as_ref().ok().map(|t| t.expires_on),
    });
    host.log(LogLevel::Info, &line.to_string());
}

/// Rewrites the effective request for upstream: the target as `:authority`, the MSI token (if
/// any) as the only credential, and none of the headers that were meant for azgate.
fn rewrite<H: Host>(host: &H, target: &str, token: Option<&AccessToken>) -> Result<(), Refusal> {
    let internal = |s| Refusal::Internal(format!("could not rewrite the request ({s:?})"));
    let bearer = token.map(|t| format!("Bearer {}", t.secret));
    host.set_request_header("authorization", bearer.as_deref())
        .map_err(internal)?;
    host.set_request_header(":authority", Some(target))
        .map_err(internal)?;
    // `proxy-authorization` is a credential for a proxy (azgate is one), never for Azure.
    for name in [
        "x-forwarded-client-cert",
        "x-forwarded-host",
        "proxy-authorization",
    ] {
        host.set_request_header(name, None).map_err(internal)?;
    }
    Ok(())
}

/// Refuses the effective request: its audit line now, and a local answer with the refusal's
/// status and Azure-style body. The request stops here ([`Action::Pause`]).
pub fn refuse<H: Host>(host: &H, audit: &AuditFields, refusal: &Refusal) -> Action {
    host.log(LogLevel::Info, &audit.line(Err(refusal)));
    let body = refusal.body();
    let mut headers = vec![
        ("content-type", "application/json; charset=utf-8"),
        ("x-azgate-error", refusal.code()),
    ];
    if let Some(challenge) = refusal.challenge() {
        headers.push(("www-authenticate", challenge));
    }
    if let Err(status) = host.send_response(refusal.status(), headers, body.as_bytes()) {
        host.log(
            LogLevel::Error,
            &format!(
                "azgate: could not send the {} refusal ({status:?})",
                refusal.code()
            ),
        );
    }
    Action::Pause
}

#[cfg(test)]
mod tests;
