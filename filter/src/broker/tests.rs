//! The broker's state machine on a fake host with a fake clock: settle, wait, coalescing,
//! orphaned fetches, timeouts, claims challenges and the audit line of every request. (Two
//! workers racing for a first claim is `token_cache`'s test: a serial fake cannot interleave
//! their reads and writes.)

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use proxy_wasm::types::{Action, LogLevel, Status};

use super::*;
use crate::policy::IdentityId;
use crate::token_cache::SharedStore;

const ROOT: u32 = 1;
const MIRID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ops";
const ARM: &str = "https://management.azure.com/";
const START_MS: i64 = 1_700_000_000_000;

/// A call-out the fake host was asked to make.
#[derive(Clone, Debug)]
struct Call {
    id: u32,
    /// The context effective when it was dispatched (the root when dispatched from a tick).
    from: u32,
    cluster: String,
    path: String,
}

/// A local answer the fake host sent.
#[derive(Clone, Debug)]
struct Sent {
    context_id: u32,
    status: u32,
    code: String,
}

/// One proxy-wasm host: a clock, shared data (with CAS), call-outs, request contexts. Two
/// brokers on one fake host are two workers sharing its shared data.
#[derive(Default)]
struct FakeHost {
    now_ms: Cell<i64>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    effective: Cell<u32>,
    /// Contexts whose stream is gone: `set_effective_context` fails for them.
    gone: RefCell<HashSet<u32>>,
    next_call: Cell<u32>,
    refuse_calls: Cell<bool>,
    calls: RefCell<Vec<Call>>,
    /// The call-out answer being delivered: status and body.
    call_answer: RefCell<Option<(String, Vec<u8>)>>,
    /// Request headers set, per context (`None`: removed).
    request_headers: RefCell<HashMap<u32, BTreeMap<String, Option<String>>>>,
    /// Upstream response headers, per context.
    response_headers: RefCell<HashMap<u32, HashMap<String, Vec<u8>>>>,
    sent: RefCell<Vec<Sent>>,
    resumed: RefCell<Vec<u32>>,
    tick_period: Cell<Duration>,
    logs: RefCell<Vec<String>>,
}

impl FakeHost {
    fn new() -> Self {
        let host = Self::default();
        host.now_ms.set(START_MS);
        host.next_call.set(100);
        host
    }

    fn advance(&self, ms: i64) {
        self.now_ms.set(self.now_ms.get() + ms);
    }

    /// The host calls into context `id` (a request callback).
    fn enter(&self, id: u32) {
        self.effective.set(id);
    }

    fn header(&self, context_id: u32, name: &str) -> Option<Option<String>> {
        self.request_headers
            .borrow()
            .get(&context_id)
            .and_then(|h| h.get(name).cloned())
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .borrow()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("decision").is_some())
            .collect()
    }

    fn logged(&self, event: &str) -> usize {
        self.logs
            .borrow()
            .iter()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .count()
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal> {
        let mut shared = self.shared.borrow_mut();
        let current = shared.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return Ok(false);
        }
        shared.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
        Ok(true)
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> i64 {
        self.now_ms.get()
    }

    fn log(&self, _: LogLevel, message: &str) {
        self.logs.borrow_mut().push(message.to_string());
    }

    fn dispatch_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        _: Duration,
    ) -> Result<u32, Status> {
        if self.refuse_calls.get() {
            return Err(Status::BadArgument);
        }
        let id = self.next_call.get();
        self.next_call.set(id + 1);
        let path = headers
            .iter()
            .find(|(n, _)| *n == ":path")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        self.calls.borrow_mut().push(Call {
            id,
            from: self.effective.get(),
            cluster: cluster.to_string(),
            path,
        });
        Ok(id)
    }

    fn call_response_header(&self, name: &str) -> Option<Vec<u8>> {
        let answer = self.call_answer.borrow();
        (name == ":status")
            .then(|| {
                answer
                    .as_ref()
                    .map(|(status, _)| status.as_bytes().to_vec())
            })
            .flatten()
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        let answer = self.call_answer.borrow();
        let body = answer.as_ref().map(|(_, b)| b.as_slice()).unwrap_or(&[]);
        body[..size.min(body.len())].to_vec()
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_headers
            .borrow()
            .get(&self.effective.get())
            .and_then(|h| h.get(name).cloned())
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), Status> {
        self.request_headers
            .borrow_mut()
            .entry(self.effective.get())
            .or_default()
            .insert(name.to_string(), value.map(str::to_string));
        Ok(())
    }

    fn send_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        _: &[u8],
    ) -> Result<(), Status> {
        let code = headers
            .iter()
            .find(|(n, _)| *n == "x-azgate-error")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        self.sent.borrow_mut().push(Sent {
            context_id: self.effective.get(),
            status,
            code,
        });
        Ok(())
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        if self.gone.borrow().contains(&context_id) {
            return Err(Status::BadArgument);
        }
        self.effective.set(context_id);
        Ok(())
    }

    fn resume_request(&self) -> Result<(), Status> {
        self.resumed.borrow_mut().push(self.effective.get());
        Ok(())
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        self.tick_period.set(period);
        Ok(())
    }
}

/// One VM: its broker and its configuration.
struct Vm {
    broker: Broker,
    config: Config,
}

impl Vm {
    fn new(host: &FakeHost, root_id: u32) -> Self {
        let config = Config::default();
        Self {
            broker: Broker::new(&config, root_id, host.now_ms() + i64::from(root_id)),
            config,
        }
    }

    /// Context `id` asks for a token for `resource` (as `on_http_request_headers` does).
    fn request(&mut self, host: &FakeHost, id: u32, resource: Option<&str>) -> Action {
        host.enter(id);
        let grant = Grant {
            target: "management.azure.com".into(),
            identity: IdentityId::parse(MIRID).expect("a valid ARM id"),
            resource: resource.map(str::to_string),
        };
        let audit = AuditFields {
            user: Some("alice".into()),
            method: "GET".into(),
            path: "/subscriptions".into(),
            started_ms: host.now_ms(),
            ..AuditFields::default()
        };
        self.broker
            .on_authorised(host, &self.config, id, grant, audit)
    }

    fn tick(&mut self, host: &FakeHost) {
        host.enter(ROOT);
        self.broker.on_tick(host, &self.config);
    }

    /// The host delivers call-out `call`'s answer (to whichever context dispatched it).
    fn answer(&mut self, host: &FakeHost, call: &Call, status: u16, body: &str) {
        host.enter(call.from);
        *host.call_answer.borrow_mut() = Some((status.to_string(), body.as_bytes().to_vec()));
        self.broker.on_call_response(host, call.id, 2, body.len());
    }

    /// Azure answers context `id`'s forwarded request with these response headers.
    fn upstream_answers(&mut self, host: &FakeHost, id: u32, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect();
        host.response_headers.borrow_mut().insert(id, headers);
        host.enter(id);
        self.broker.on_response_headers(host, id);
    }

    fn end(&mut self, host: &FakeHost, id: u32) {
        host.enter(id);
        self.broker.on_stream_end(host, id);
    }

    /// Ticks at the configured interval for `ms`.
    fn run_for(&mut self, host: &FakeHost, ms: i64) {
        let step = self.config.token_wait_poll_ms as i64;
        for _ in 0..ms / step {
            host.advance(step);
            self.tick(host);
        }
    }
}

fn token_body(host: &FakeHost, secret: &str, lifetime_s: i64) -> String {
    serde_json::json!({
        "access_token": secret,
        "expires_on": (host.now_ms() / 1000 + lifetime_s).to_string(),
        "token_type": "Bearer",
    })
    .to_string()
}

fn bearer(host: &FakeHost, id: u32) -> Option<String> {
    host.header(id, "authorization").flatten()
}

/// A first request for a key settles its claim for one poll interval, then fetches: the one
/// call-out the VM makes for the key.
fn fetching(host: &FakeHost, vm: &mut Vm, id: u32) -> Call {
    assert_eq!(vm.request(host, id, Some(ARM)), Action::Pause);
    assert!(
        host.calls.borrow().is_empty(),
        "a first claim settles first"
    );
    assert_eq!(host.tick_period.get(), Duration::from_millis(10));
    vm.run_for(host, 10);
    let calls = host.calls.borrow();
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].clone()
}

/// A VM whose first request (context 10) fetched `secret` and went upstream with it.
fn holding_token(secret: &str) -> (FakeHost, Vm) {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    let call = fetching(&host, &mut vm, 10);
    vm.answer(&host, &call, 200, &token_body(&host, secret, 3600));
    (host, vm)
}

#[test]
fn concurrent_requests_share_one_call_out_and_resume_with_the_token() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    let call = fetching(&host, &mut vm, 10);
    assert_eq!(vm.request(&host, 11, Some(ARM)), Action::Pause);
    assert_eq!(vm.request(&host, 12, Some(ARM)), Action::Pause);
    vm.run_for(&host, 50);
    assert_eq!(host.calls.borrow().len(), 1, "coalesced");
    assert_eq!(call.cluster, "azgate_msi");
    assert!(call.path.starts_with("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&msi_res_id="));
    assert_eq!(
        call.from, ROOT,
        "dispatched from the tick that confirmed the claim"
    );

    vm.answer(&host, &call, 200, &token_body(&host, "tok-1", 3600));
    assert_eq!(*host.resumed.borrow(), vec![10, 11, 12]);
    for id in [10, 11, 12] {
        assert_eq!(bearer(&host, id).as_deref(), Some("Bearer tok-1"));
        assert_eq!(
            host.header(id, ":authority"),
            Some(Some("management.azure.com".into()))
        );
        assert_eq!(host.header(id, "x-forwarded-client-cert"), Some(None));
        assert_eq!(host.header(id, "x-forwarded-host"), Some(None));
        assert_eq!(host.header(id, "proxy-authorization"), Some(None));
    }
    assert_eq!(host.tick_period.get(), Duration::ZERO, "idle: no tick");
    assert_eq!(host.logged("azgate.token_fetch"), 1);
    // The audit lines wait for the end of each stream, and are written once.
    assert!(host.audit_lines().is_empty());
    for id in [10, 11, 12] {
        vm.end(&host, id);
        vm.end(&host, id);
    }
    let lines = host.audit_lines();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["decision"] == "allow"));
    assert!(lines.iter().all(|l| l["token_cached"] == false));
    assert!(
        !host.logs.borrow().iter().any(|l| l.contains("tok-1")),
        "no token in a log line"
    );
}

#[test]
fn a_cached_token_continues_inline_without_a_call_out() {
    let (host, mut vm) = holding_token("tok-1");
    host.advance(60_000);
    assert_eq!(vm.request(&host, 20, Some(ARM)), Action::Continue);
    assert_eq!(bearer(&host, 20).as_deref(), Some("Bearer tok-1"));
    assert!(
        !host.resumed.borrow().contains(&20),
        "inline: continued, not resumed"
    );
    assert_eq!(host.calls.borrow().len(), 1);
    vm.end(&host, 20);
    assert_eq!(host.audit_lines()[0]["token_cached"], true);
}

#[test]
fn unauthenticated_forwarding_injects_no_token() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    assert_eq!(vm.request(&host, 10, None), Action::Continue);
    assert_eq!(host.header(10, "authorization"), Some(None), "removed");
    assert!(host.calls.borrow().is_empty());
    vm.end(&host, 10);
    let lines = host.audit_lines();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].get("token_cached").is_none_or(|v| v.is_null()));
}

#[test]
fn a_fetch_whose_owner_went_away_is_dispatched_again_from_the_root() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    host.shared.borrow_mut().clear();
    // A key another worker once failed for: CAS is possible, so the first request fetches
    // inline, from its own context.
    let key = token_cache::cache_key(IdentityId::parse(MIRID).expect("valid").folded(), ARM);
    host.set(&key, b"{}", None).expect("fake store");
    assert_eq!(vm.request(&host, 10, Some(ARM)), Action::Pause);
    let first = host.calls.borrow()[0].clone();
    assert_eq!(first.from, 10);
    assert_eq!(vm.request(&host, 11, Some(ARM)), Action::Pause);
    // The owner's stream ends before the answer, which the SDK would now drop.
    vm.end(&host, 10);
    host.gone.borrow_mut().insert(10);
    vm.run_for(&host, 10);
    let second = host.calls.borrow().last().cloned().expect("re-dispatched");
    assert_eq!(second.from, ROOT);
    assert_ne!(second.id, first.id);
    // The dropped answer, if it came anyway, is ignored; the root's answer releases 11.
    vm.answer(&host, &first, 200, &token_body(&host, "stale", 3600));
    assert!(host.resumed.borrow().is_empty());
    vm.answer(&host, &second, 200, &token_body(&host, "tok-2", 3600));
    assert_eq!(*host.resumed.borrow(), vec![11]);
    assert_eq!(bearer(&host, 11).as_deref(), Some("Bearer tok-2"));
}

#[test]
fn waiters_time_out_with_504_and_an_audit_line() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    let _call = fetching(&host, &mut vm, 10);
    // The host never answers: the budget is a settle interval plus two claim lifetimes.
    let budget = waiter_budget_ms(&vm.config);
    vm.run_for(&host, budget - 20);
    assert!(host.sent.borrow().is_empty());
    vm.run_for(&host, 20);
    let sent = host.sent.borrow().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].context_id, sent[0].status), (10, 504));
    assert_eq!(sent[0].code, "TokenServiceTimeout");
    let lines = host.audit_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["decision"], "deny");
    assert!(host.resumed.borrow().is_empty());
    // A claim that outlived the call timeout was fetched again, once per lifetime.
    assert_eq!(host.calls.borrow().len(), 2);
}

#[test]
fn another_workers_fetch_is_awaited_and_served_from_the_shared_cache() {
    let host = FakeHost::new();
    let mut a = Vm::new(&host, ROOT);
    let mut b = Vm::new(&host, 2);
    let call = fetching(&host, &mut a, 10);
    assert_eq!(b.request(&host, 20, Some(ARM)), Action::Pause);
    b.run_for(&host, 30);
    assert_eq!(host.calls.borrow().len(), 1, "worker b does not fetch");
    a.answer(&host, &call, 200, &token_body(&host, "tok-a", 3600));
    assert!(!host.resumed.borrow().contains(&20));
    b.run_for(&host, 10);
    assert!(host.resumed.borrow().contains(&20));
    assert_eq!(bearer(&host, 20).as_deref(), Some("Bearer tok-a"));
    b.end(&host, 20);
    let lines = host.audit_lines();
    assert_eq!(lines[0]["token_cached"], true);
}

#[test]
fn a_call_out_that_cannot_start_refuses_with_503_and_is_published() {
    let host = FakeHost::new();
    let mut a = Vm::new(&host, ROOT);
    let mut b = Vm::new(&host, 2);
    host.refuse_calls.set(true);
    assert_eq!(a.request(&host, 10, Some(ARM)), Action::Pause);
    assert_eq!(b.request(&host, 20, Some(ARM)), Action::Pause);
    a.run_for(&host, 10);
    b.run_for(&host, 10);
    let sent = host.sent.borrow().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent.iter()
            .all(|s| s.status == 503 && s.code == "TokenUnavailable")
    );
    assert_eq!(host.audit_lines().len(), 2);
}

#[test]
fn token_service_failures_refuse_every_waiter() {
    let cases: [(u16, &str, usize, u32, &str); 4] = [
        (200, "{not json", 2, 502, "InvalidTokenServiceResponse"),
        (
            200,
            r#"{"access_token":"t"}"#,
            2,
            502,
            "InvalidTokenServiceResponse",
        ),
        (500, r#"{"error":"unknown"}"#, 2, 503, "TokenUnavailable"),
        // No headers: Envoy's report of a reset or a refused connection.
        (200, "", 0, 503, "TokenUnavailable"),
    ];
    for (status, body, headers, want_status, want_code) in cases {
        let host = FakeHost::new();
        let mut vm = Vm::new(&host, ROOT);
        let call = fetching(&host, &mut vm, 10);
        assert_eq!(vm.request(&host, 11, Some(ARM)), Action::Pause);
        host.enter(call.from);
        *host.call_answer.borrow_mut() = Some((status.to_string(), body.as_bytes().to_vec()));
        vm.broker
            .on_call_response(&host, call.id, headers, body.len());
        let sent = host.sent.borrow().clone();
        assert_eq!(sent.len(), 2, "{body}: {sent:?}");
        for s in &sent {
            assert_eq!(
                (s.status, s.code.as_str()),
                (want_status, want_code),
                "{body}"
            );
        }
        assert!(host.resumed.borrow().is_empty());
        assert_eq!(host.audit_lines().len(), 2);
    }
}

#[test]
fn an_oversized_token_answer_is_refused_unread() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    let call = fetching(&host, &mut vm, 10);
    host.enter(call.from);
    *host.call_answer.borrow_mut() = Some(("200".into(), Vec::new()));
    vm.broker
        .on_call_response(&host, call.id, 2, MAX_TOKEN_RESPONSE_BYTES + 1);
    assert_eq!(host.sent.borrow()[0].code, "InvalidTokenServiceResponse");
}

#[test]
fn a_request_whose_stream_is_gone_is_skipped() {
    let host = FakeHost::new();
    let mut vm = Vm::new(&host, ROOT);
    let call = fetching(&host, &mut vm, 10);
    assert_eq!(vm.request(&host, 11, Some(ARM)), Action::Pause);
    // 11 vanished without the host telling the filter.
    host.gone.borrow_mut().insert(11);
    vm.answer(&host, &call, 200, &token_body(&host, "tok", 3600));
    assert_eq!(*host.resumed.borrow(), vec![10]);
    assert_eq!(bearer(&host, 11), None);
}

#[test]
fn a_claims_challenge_revokes_the_token_and_the_next_fetch_names_it() {
    let (host, mut vm) = holding_token("tok-1");
    vm.upstream_answers(
        &host,
        10,
        &[
            (":status", "401"),
            (
                "www-authenticate",
                r#"Bearer realm="", error="insufficient_claims", claims="e30=""#,
            ),
            ("x-ms-request-id", "req-1"),
        ],
    );
    assert_eq!(host.logged("azgate.cae_revocation"), 1);
    vm.end(&host, 10);
    assert_eq!(host.audit_lines()[0]["upstream_status"], 401);

    // The revoked token is never injected again: the next request fetches, naming it.
    assert_eq!(vm.request(&host, 20, Some(ARM)), Action::Pause);
    let calls = host.calls.borrow().clone();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1].path.contains(&format!(
            "token_sha256_to_refresh={}",
            token_cache::token_sha256("tok-1")
        )),
        "{}",
        calls[1].path
    );
    vm.answer(&host, &calls[1], 200, &token_body(&host, "tok-2", 3600));
    assert_eq!(vm.request(&host, 21, Some(ARM)), Action::Continue);
    assert_eq!(bearer(&host, 21).as_deref(), Some("Bearer tok-2"));
}

#[test]
fn a_plain_401_or_a_success_revokes_nothing() {
    for (status, challenge) in [("401", r#"Bearer realm="""#), ("200", "")] {
        let (host, mut vm) = holding_token("tok-1");
        vm.upstream_answers(
            &host,
            10,
            &[(":status", status), ("www-authenticate", challenge)],
        );
        assert_eq!(host.logged("azgate.cae_revocation"), 0);
        assert_eq!(vm.request(&host, 20, Some(ARM)), Action::Continue);
    }
}

#[test]
fn refuse_answers_with_the_refusal_and_writes_its_audit_line() {
    let host = FakeHost::new();
    host.enter(7);
    let refusal = Refusal::TokenUnavailable("no".into());
    assert_eq!(
        refuse(&host, &AuditFields::default(), &refusal),
        Action::Pause
    );
    let sent = host.sent.borrow().clone();
    assert_eq!((sent[0].context_id, sent[0].status), (7, 503));
    assert_eq!(host.audit_lines().len(), 1);
}
