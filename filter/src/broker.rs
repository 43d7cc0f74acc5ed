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

use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::config::Config;
use crate::decision::{AuditFields, Grant};
use crate::error::Refusal;
use crate::host::{self, HostSharedData};
use crate::imds::{self, AccessToken};
use crate::token_cache::{self, Acquire, Poll, Rules};

/// Largest token-service answer read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// A paused request.
struct Waiter {
    context_id: u32,
    /// The cache key of its (identity, resource).
    key: String,
    grant: Grant,
    audit: AuditFields,
    deadline_ms: i64,
}

/// Where the fetch for a key stands, seen from this VM.
enum Phase {
    /// This VM dispatched call-out `call` from context `owner` at `started_ms`.
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

pub(crate) struct Broker {
    root_id: u32,
    rules: Rules,
    nonce: u64,
    pending: HashMap<String, Pending>,
    calls: HashMap<u32, String>,
    ticking: bool,
}

impl Broker {
    pub(crate) fn new(config: &Config, root_id: u32, now_ms: i64) -> Self {
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
        }
    }

    /// Gets the token for an authorised request of context `context_id`: inline on a cache hit
    /// (the request continues), otherwise by pausing it until the token arrives.
    pub(crate) fn request_token(
        &mut self,
        config: &Config,
        store: &HostSharedData,
        context_id: u32,
        grant: Grant,
        audit: AuditFields,
        now_ms: i64,
    ) -> Action {
        let resource = grant.resource.clone().unwrap_or_default();
        let key = token_cache::cache_key(grant.identity.folded(), &resource);
        let waiter = Waiter {
            context_id,
            key: key.clone(),
            deadline_ms: now_ms + waiter_budget_ms(config),
            grant,
            audit,
        };
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.waiters.push(waiter);
            return Action::Pause;
        }
        let identity = waiter.grant.identity.as_str().to_string();
        let phase = match self.rules.acquire(store, &key, now_ms, self.nonce) {
            Ok(Acquire::Hit(token)) => return finish_inline(waiter, Ok(&token)),
            Ok(Acquire::Fetch) => match self.dispatch(config, &key, &identity, &resource) {
                Ok(()) => Phase::Fetching {
                    owner: context_id,
                    started_ms: now_ms,
                },
                Err(refusal) => {
                    self.publish(store, &key, &Err(refusal.clone()), now_ms);
                    return finish_inline(waiter, Err(&refusal));
                }
            },
            Ok(Acquire::Settle) => Phase::Settling { since_ms: now_ms },
            Ok(Acquire::Wait) => Phase::Waiting { since_ms: now_ms },
            Err(refusal) => return finish_inline(waiter, Err(&refusal)),
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
        self.ensure_ticking(config);
        Action::Pause
    }

    /// A call-out answered (or failed): publish the outcome and release this VM's waiters.
    pub(crate) fn on_call_response(
        &mut self,
        config: &Config,
        call: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        let Some(key) = self.calls.remove(&call) else {
            return;
        };
        let now_ms = host::now_ms();
        let outcome = read_token_response(num_headers, body_size, now_ms / 1000);
        self.publish(&HostSharedData, &key, &outcome, now_ms);
        if let Some(pending) = self.pending.remove(&key) {
            log_fetch(config, &pending, &outcome);
            for waiter in pending.waiters {
                finish_deferred(waiter, outcome.as_ref(), false);
            }
        }
    }

    /// The request of `context_id` is finished: it no longer waits, and a fetch it owned is
    /// re-dispatched by the root.
    pub(crate) fn forget(&mut self, context_id: u32) {
        for pending in self.pending.values_mut() {
            pending.waiters.retain(|w| w.context_id != context_id);
            if matches!(pending.phase, Phase::Fetching { owner, .. } if owner == context_id) {
                pending.phase = Phase::Orphaned;
            }
        }
    }

    /// Polls other workers' fetches, confirms first claims, re-dispatches orphaned fetches and
    /// times out waiters past their deadline.
    pub(crate) fn on_tick(&mut self, config: &Config, now_ms: i64) {
        let store = HostSharedData;
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
                finish_deferred(waiter, Err(&timeout), false);
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
                        self.rules.confirm(&store, &key, self.nonce, now_ms)
                    }
                }
                Phase::Waiting { since_ms } => {
                    self.rules.poll(&store, &key, since_ms, now_ms, self.nonce)
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
                        finish_deferred(waiter, Ok(&token), true);
                    }
                }
                Ok(Poll::Failed(refusal)) | Err(refusal) => {
                    for waiter in pending.waiters {
                        finish_deferred(waiter, Err(&refusal), false);
                    }
                }
                Ok(Poll::Settle) => {
                    pending.phase = Phase::Settling { since_ms: now_ms };
                    self.pending.insert(key, pending);
                }
                Ok(Poll::Fetch) => {
                    // Dispatched from the tick, so the answer comes to the root context.
                    self.calls.retain(|_, k| *k != key);
                    match self.dispatch(config, &key, &pending.identity, &pending.resource) {
                        Ok(()) => {
                            pending.phase = Phase::Fetching {
                                owner: self.root_id,
                                started_ms: now_ms,
                            };
                            self.pending.insert(key, pending);
                        }
                        Err(refusal) => {
                            self.publish(&store, &key, &Err(refusal.clone()), now_ms);
                            for waiter in pending.waiters {
                                finish_deferred(waiter, Err(&refusal), false);
                            }
                        }
                    }
                }
            }
        }
        if self.pending.is_empty() && self.ticking {
            let _ = hostcalls::set_tick_period(Duration::ZERO);
            self.ticking = false;
        }
    }

    fn dispatch(
        &mut self,
        config: &Config,
        key: &str,
        identity: &str,
        resource: &str,
    ) -> Result<(), Refusal> {
        let refresh = self.rules.refresh_hash(&HostSharedData, key);
        let path = imds::token_request_path(identity, resource, refresh.as_deref());
        let call = hostcalls::dispatch_http_call(
            &config.token_cluster,
            vec![
                (":method", "GET"),
                (":path", &path),
                (":authority", &config.token_authority),
                ("metadata", "true"),
            ],
            None,
            vec![],
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

    fn publish(
        &self,
        store: &HostSharedData,
        key: &str,
        outcome: &Result<AccessToken, Refusal>,
        now_ms: i64,
    ) {
        if let Err(refusal) = self.rules.complete(store, key, outcome, now_ms) {
            host::log(
                LogLevel::Error,
                &format!("azgate: could not publish a token outcome: {refusal}"),
            );
        }
    }

    /// Azure answered a request carrying `token` with a claims challenge: revoke it for every
    /// worker.
    pub(crate) fn revoke(&self, key: &str, token: &str) {
        match self.rules.revoke(&HostSharedData, key, token) {
            Ok(revoked) => host::log(
                LogLevel::Info,
                &serde_json::json!({"event": "azgate.cae_revocation", "revoked": revoked})
                    .to_string(),
            ),
            Err(refusal) => host::log(
                LogLevel::Error,
                &format!("azgate: could not revoke a refused token: {refusal}"),
            ),
        }
    }

    fn ensure_ticking(&mut self, config: &Config) {
        if !self.ticking {
            let period = Duration::from_millis(config.token_wait_poll_ms);
            self.ticking = hostcalls::set_tick_period(period).is_ok();
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

fn read_token_response(
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
    // Bytes: the string API traps on a non-UTF-8 value, and the answer is not ours.
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        .ok_or_else(|| {
            Refusal::InvalidTokenServiceResponse("the token service answer has no status".into())
        })?;
    if body_size > MAX_TOKEN_RESPONSE_BYTES {
        return Err(Refusal::InvalidTokenServiceResponse(
            "the token service answer is too large".into(),
        ));
    }
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    imds::parse_token_response(status, &body, now_s)
}

fn log_fetch(_config: &Config, pending: &Pending, outcome: &Result<AccessToken, Refusal>) {
    let line = serde_json::json!({
        "event": "azgate.token_fetch",
        "identity": pending.identity,
        "resource": pending.resource,
        "outcome": outcome.as_ref().map(|_| "ok").unwrap_or_else(|r| r.code()),
        "expires_on": outcome.as_ref().ok().map(|t| t.expires_on),
    });
    host::log(LogLevel::Info, &line.to_string());
}

/// Applies the outcome to the request's headers, or gives the refusal to answer with.
fn apply(waiter: &Waiter, outcome: Result<&AccessToken, &Refusal>) -> Result<(), Refusal> {
    match outcome {
        Ok(token) => host::rewrite(&waiter.grant.target, Some(token)),
        Err(refusal) => Err(refusal.clone()),
    }
}

/// The cache key and the token a forwarded request carries, so a claims challenge in Azure's
/// answer can revoke exactly that token.
fn injected(waiter: &Waiter, outcome: Result<&AccessToken, &Refusal>) -> Option<(String, String)> {
    outcome
        .ok()
        .map(|token| (waiter.key.clone(), token.secret.clone()))
}

/// Completes a request inside its own `on_http_request_headers`.
fn finish_inline(waiter: Waiter, outcome: Result<&AccessToken, &Refusal>) -> Action {
    match apply(&waiter, outcome) {
        Ok(()) => {
            let injected = injected(&waiter, outcome);
            host::forwarded(waiter.context_id, waiter.audit, Some(true), injected);
            Action::Continue
        }
        Err(refusal) => {
            host::log(LogLevel::Info, &waiter.audit.line(Err(&refusal)));
            host::refuse(&refusal);
            Action::Pause
        }
    }
}

/// Completes a paused request from another callback: switch to its context, then resume it
/// or answer it. A request whose stream is gone is skipped.
fn finish_deferred(waiter: Waiter, outcome: Result<&AccessToken, &Refusal>, cached: bool) {
    if hostcalls::set_effective_context(waiter.context_id).is_err() {
        return;
    }
    match apply(&waiter, outcome) {
        Ok(()) => {
            let injected = injected(&waiter, outcome);
            host::forwarded(waiter.context_id, waiter.audit, Some(cached), injected);
            if let Err(status) = hostcalls::resume_http_request() {
                host::log(
                    LogLevel::Error,
                    &format!("azgate: could not resume a request ({status:?})"),
                );
            }
        }
        Err(refusal) => {
            host::log(LogLevel::Info, &waiter.audit.line(Err(&refusal)));
            host::refuse(&refusal);
        }
    }
}
