//! The proxy-wasm glue: one root context per VM parses the configuration once; request contexts
//! are thin and hand every decision to [`crate::decision`] and every token to the broker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};

use crate::broker::Broker;
use crate::config::Config;
use crate::decision::{self, AuditFields, UpstreamFields, VerificationCache};
use crate::error::Refusal;
use crate::imds::{self, AccessToken};
use crate::token_cache::SharedStore;

/// Installs the root context factory.
pub(crate) fn register() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|root_id| Box::new(Root::new(root_id)));
}

/// Wall-clock Unix milliseconds from the host. A failing clock yields 0, which every time check
/// treats as "not valid yet": fail closed.
pub(crate) fn now_ms() -> i64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// Logs at `level`; logging failures are ignored (there is nowhere else to report them).
pub(crate) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

thread_local! {
    /// Audit records of forwarded requests, by context id, until the response is known: the
    /// line is written at the end of the stream (`on_log`, or `on_done` if the host skips it)
    /// with Azure's status and request ids. A VM is single-threaded; this is per VM.
    static FORWARDED: RefCell<HashMap<u32, Forwarded>> = RefCell::new(HashMap::new());
}

/// A request that went upstream, until its stream ends.
struct Forwarded {
    audit: AuditFields,
    /// (cache key, token) injected: revoked if Azure answers with a claims challenge.
    injected: Option<(String, String)>,
}

/// The request of `context_id` goes upstream; its audit line waits for the response.
pub(crate) fn forwarded(
    context_id: u32,
    mut audit: AuditFields,
    token_cached: Option<bool>,
    injected: Option<(String, String)>,
) {
    audit.token_cached = token_cached;
    FORWARDED.with(|f| {
        f.borrow_mut()
            .insert(context_id, Forwarded { audit, injected })
    });
}

/// Writes the audit line of a forwarded request that has ended, once.
fn write_forwarded(context_id: u32) {
    if let Some(done) = FORWARDED.with(|f| f.borrow_mut().remove(&context_id)) {
        log(LogLevel::Info, &done.audit.line(Ok(())));
    }
}

/// Per-VM state shared by the root and request contexts.
struct Shared {
    /// Replaced when the host configures the VM again (a policy reload); the broker's fetches
    /// and the verification cache carry over.
    config: RefCell<Rc<Config>>,
    broker: RefCell<Broker>,
    verified: RefCell<VerificationCache>,
}

impl Shared {
    /// The configuration in force now.
    fn config(&self) -> Rc<Config> {
        self.config.borrow().clone()
    }
}

/// A call-out answer reaches the broker whichever context dispatched it (the root re-dispatches
/// fetches whose request went away).
fn deliver_call_response(shared: Option<&Shared>, token: u32, headers: usize, body: usize) {
    if let Some(shared) = shared {
        shared
            .broker
            .borrow_mut()
            .on_call_response(&shared.config(), token, headers, body);
    }
}

// === impl Root ===

struct Root {
    id: u32,
    shared: Option<Rc<Shared>>,
}

impl Root {
    fn new(id: u32) -> Self {
        Self { id, shared: None }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        deliver_call_response(self.shared.as_deref(), token, headers, body);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) if self.shared.is_some() => {
                log(
                    LogLevel::Info,
                    &format!(
                        "azgate: reconfigured with {} roles, {} locks",
                        config.roles.len(),
                        config.locks.len()
                    ),
                );
                if let Some(shared) = &self.shared {
                    *shared.config.borrow_mut() = Rc::new(config);
                }
                true
            }
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "azgate: configured with {} roles, {} locks, token cluster {:?}",
                        config.roles.len(),
                        config.locks.len(),
                        config.token_cluster
                    ),
                );
                if !config.locks.ignored().is_empty() {
                    log(
                        LogLevel::Info,
                        &format!(
                            "azgate: locks {:?} target only what app certificates do not carry \
                             (logins, nodes, devices, ...); they never apply here",
                            config.locks.ignored()
                        ),
                    );
                }
                let verified = VerificationCache::new(config.verified_token_cache_size);
                let broker = Broker::new(&config, self.id, now_ms());
                self.shared = Some(Rc::new(Shared {
                    config: RefCell::new(Rc::new(config)),
                    broker: RefCell::new(broker),
                    verified: RefCell::new(verified),
                }));
                true
            }
            Err(err) if self.shared.is_some() => {
                log(
                    LogLevel::Critical,
                    &format!("azgate: {err}; the previous configuration stays in force"),
                );
                false
            }
            Err(err) => {
                log(LogLevel::Critical, &format!("azgate: {err}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared
                .broker
                .borrow_mut()
                .on_tick(&shared.config(), now_ms());
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id: context_id,
            shared: self.shared.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// === impl Request ===

struct Request {
    id: u32,
    /// `None` only if the configuration was refused, in which case the host never starts the
    /// plugin; kept optional so a misbehaving host gets a refusal rather than a trap.
    shared: Option<Rc<Shared>>,
}

impl Context for Request {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        deliver_call_response(self.shared.as_deref(), token, headers, body);
    }

    fn on_done(&mut self) -> bool {
        if let Some(shared) = &self.shared {
            shared.broker.borrow_mut().forget(self.id);
        }
        write_forwarded(self.id);
        true
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            refuse(&Refusal::Internal("the filter is not configured".into()));
            return Action::Pause;
        };
        // Bytes, not strings: the SDK's string API traps on a non-UTF-8 value.
        let headers = self.get_http_request_headers_bytes();
        let now = now_ms();
        let config = shared.config();
        let (mut audit, decided) = decision::decide_header_map(
            &headers,
            &config,
            now / 1000,
            &mut shared.verified.borrow_mut(),
        );
        audit.started_ms = now;
        let grant = match decided {
            Ok(grant) => grant,
            Err(refusal) => {
                log(LogLevel::Info, &audit.line(Err(&refusal)));
                refuse(&refusal);
                return Action::Pause;
            }
        };
        if grant.resource.is_none() {
            // Unauthenticated forwarding (allowed by configuration): no token is injected.
            return match rewrite(&grant.target, None) {
                Ok(()) => {
                    forwarded(self.id, audit, None, None);
                    Action::Continue
                }
                Err(refusal) => {
                    log(LogLevel::Info, &audit.line(Err(&refusal)));
                    refuse(&refusal);
                    Action::Pause
                }
            };
        }
        let mut broker = shared.broker.borrow_mut();
        broker.request_token(&config, &HostSharedData, self.id, grant, audit, now)
    }

    fn on_log(&mut self) {
        write_forwarded(self.id);
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let header = |name: &str| {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
                .ok()
                .flatten()
        };
        let revoke = FORWARDED.with(|f| {
            let mut forwarded = f.borrow_mut();
            let entry = forwarded.get_mut(&self.id)?;
            let upstream = UpstreamFields::from_response(
                header(":status").as_deref(),
                header("x-ms-request-id").as_deref(),
                header("x-ms-correlation-request-id").as_deref(),
                entry.audit.started_ms,
                now_ms(),
            );
            let challenged = upstream.status == 401
                && header("www-authenticate").is_some_and(|v| imds::is_claims_challenge(&v));
            entry.audit.upstream = Some(upstream);
            if challenged {
                entry.injected.take()
            } else {
                None
            }
        });
        // The 401 goes to the client unchanged; the token it carried is not used again.
        if let (Some((key, token)), Some(shared)) = (revoke, &self.shared) {
            shared.broker.borrow().revoke(&key, &token);
        }
        Action::Continue
    }
}

/// Rewrites the request for upstream: the target as `:authority`, the MSI token (if any) as the
/// only credential, and none of the headers that were meant for azgate.
pub(crate) fn rewrite(target: &str, token: Option<&AccessToken>) -> Result<(), Refusal> {
    let internal = |s: Status| Refusal::Internal(format!("could not rewrite the request ({s:?})"));
    let bearer = token.map(|t| format!("Bearer {}", t.secret));
    hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        "authorization",
        bearer.as_deref(),
    )
    .map_err(internal)?;
    hostcalls::set_map_value(MapType::HttpRequestHeaders, ":authority", Some(target))
        .map_err(internal)?;
    for name in ["x-forwarded-client-cert", "x-forwarded-host"] {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None).map_err(internal)?;
    }
    Ok(())
}

/// Answers the effective context's request locally with the refusal's status and Azure-style
/// body.
pub(crate) fn refuse(refusal: &Refusal) {
    let body = refusal.body();
    let mut headers = vec![
        ("content-type", "application/json; charset=utf-8"),
        ("x-azgate-error", refusal.code()),
    ];
    if let Some(challenge) = refusal.challenge() {
        headers.push(("www-authenticate", challenge));
    }
    let sent = hostcalls::send_http_response(refusal.status(), headers, Some(body.as_bytes()));
    if let Err(status) = sent {
        log(
            LogLevel::Error,
            &format!(
                "azgate: could not send the {} refusal ({status:?})",
                refusal.code()
            ),
        );
    }
}

/// proxy-wasm shared data, visible to every worker's VM.
pub(crate) struct HostSharedData;

impl SharedStore for HostSharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(Refusal::Internal(format!(
                "shared data write failed ({status:?})"
            ))),
        }
    }
}
