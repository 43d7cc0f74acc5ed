//! The proxy-wasm contexts: one root context per VM parses the configuration once; request
//! contexts are thin and hand every decision to [`crate::decision`] and every token, rewrite
//! and audit line to [`crate::broker`].

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::broker::{self, Broker};
use crate::config::Config;
use crate::decision::{self, AuditFields, VerificationCache};
use crate::error::Refusal;
use crate::host::{Host, ProxyWasm};

/// Installs the root context factory.
pub(crate) fn register() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|root_id| Box::new(Root::new(root_id)));
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
            .on_call_response(&ProxyWasm, token, headers, body);
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
        let host = ProxyWasm;
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) if self.shared.is_some() => {
                host.log(
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
                host.log(
                    LogLevel::Info,
                    &format!(
                        "azgate: configured with {} roles, {} locks, token cluster {:?}",
                        config.roles.len(),
                        config.locks.len(),
                        config.token_cluster
                    ),
                );
                if !config.locks.ignored().is_empty() {
                    host.log(
                        LogLevel::Info,
                        &format!(
                            "azgate: locks {:?} target only what app certificates do not carry \
                             (logins, nodes, devices, ...); they never apply here",
                            config.locks.ignored()
                        ),
                    );
                }
                let verified = VerificationCache::new(config.verified_token_cache_size);
                let broker = Broker::new(&config, self.id, host.now_ms());
                self.shared = Some(Rc::new(Shared {
                    config: RefCell::new(Rc::new(config)),
                    broker: RefCell::new(broker),
                    verified: RefCell::new(verified),
                }));
                true
            }
            Err(err) if self.shared.is_some() => {
                host.log(
                    LogLevel::Critical,
                    &format!("azgate: {err}; the previous configuration stays in force"),
                );
                false
            }
            Err(err) => {
                host.log(LogLevel::Critical, &format!("azgate: {err}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared
                .broker
                .borrow_mut()
                .on_tick(&ProxyWasm, &shared.config());
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

impl Request {
    fn stream_end(&self) {
        if let Some(shared) = &self.shared {
            shared
                .broker
                .borrow_mut()
                .on_stream_end(&ProxyWasm, self.id);
        }
    }
}

impl Context for Request {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        deliver_call_response(self.shared.as_deref(), token, headers, body);
    }

    fn on_done(&mut self) -> bool {
        self.stream_end();
        true
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let host = ProxyWasm;
        let Some(shared) = self.shared.clone() else {
            let refusal = Refusal::Internal("the filter is not configured".into());
            return broker::refuse(&host, &AuditFields::default(), &refusal);
        };
        // Bytes, not strings: the SDK's string API traps on a non-UTF-8 value.
        let headers = self.get_http_request_headers_bytes();
        let now = host.now_ms();
        let config = shared.config();
        let (mut audit, decided) = decision::decide_header_map(
            &headers,
            &config,
            now / 1000,
            &mut shared.verified.borrow_mut(),
        );
        audit.started_ms = now;
        match decided {
            Ok(grant) => shared
                .broker
                .borrow_mut()
                .on_authorised(&host, &config, self.id, grant, audit),
            Err(refusal) => broker::refuse(&host, &audit, &refusal),
        }
    }

    fn on_log(&mut self) {
        self.stream_end();
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(shared) = &self.shared {
            shared
                .broker
                .borrow_mut()
                .on_response_headers(&ProxyWasm, self.id);
        }
        Action::Continue
    }
}
