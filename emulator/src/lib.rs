//! An in-process emulator of the Azure managed-identity endpoints, for tests and demos.
//!
//! One [`Emulator`] serves, on one loopback port:
//!
//! | path | protocol |
//! |---|---|
//! | `GET /metadata/identity/oauth2/token` | IMDS (VM/VMSS): `Metadata: true` required, `X-Forwarded-For` refused, `api-version` required, duplicate query parameters refused, selectors `client_id` / `object_id` / `msi_res_id` (at most one); every number in the answer is a JSON string, as real IMDS sends it |
//! | `GET /metadata/identity/info` | IMDS `{"tenantId": …}` |
//! | `GET /msi/token` | App Service / Functions 2019-08-01 (`IDENTITY_ENDPOINT=http://ADDR/msi/token`, `X-IDENTITY-HEADER` must equal [`Emulator::identity_header`]); selectors `client_id`, `object_id`/`principal_id`, `mi_res_id`; answers `expires_on` as an epoch string and no `expires_in` |
//! | `POST /{tenant}/oauth2/v2.0/token` | Entra ID client-credentials grant (`client_secret`, or `client_assertion` as sent by workload identity and certificate credentials), so those sources can be tested without the internet |
//! | `/emulator/*` | the admin API described below |
//!
//! Access tokens are JWT-shaped (`header.payload.signature`, base64url JSON, signature not
//! verifiable) with the claims a real managed-identity token carries and that azgate or its
//! clients read: `aud` (the requested resource), `iss`, `iat`, `nbf`, `exp`, `tid`, `oid`,
//! `sub`, `appid`, `xms_mirid` (the ARM id of the identity), and a unique `uti`.
//!
//! # Identities
//!
//! Every selector is accepted and names a deterministic identity: a `msi_res_id` becomes the
//! token's `xms_mirid`; a `client_id` or `object_id` is mapped to a user-assigned identity named
//! after it; no selector means the VM's system-assigned identity ([`SYSTEM_ASSIGNED_RESOURCE_ID`]).
//!
//! # Faults
//!
//! [`Emulator::set_fault`] sets the behaviour of every later token request (all three token
//! endpoints); [`Emulator::push_faults`] queues one-shot faults that the next requests take in
//! order before the standing fault applies again; [`Emulator::schedule_faults`] sets faults by
//! time ("410 for the next 60 s, then recover"). A token request takes the first queued
//! one-shot fault, else the schedule's current step, else the standing fault. A request that
//! hangs keeps hanging after its step ends, as a real stuck connection would: its client has to
//! give up. The admin API does the same over HTTP, for `azgate-imds-emulator`:
//!
//! ```text
//! curl -X POST http://ADDR/emulator/fault -d '{"fault":"status","status":429,"retry_after":7}'
//! curl -X POST http://ADDR/emulator/fault -d '{"fault":"none"}'
//! curl -X POST http://ADDR/emulator/faults -d '[{"fault":"status","status":500},{"fault":"hang"}]'
//! curl -X POST http://ADDR/emulator/schedule -d '[{"for_ms":60000,"fault":{"fault":"status","status":410}}]'
//! curl -X POST http://ADDR/emulator/token-lifetime -d '{"seconds":600}'
//! curl http://ADDR/emulator/stats      # {"token_requests":3,"in_flight":0,"peak_in_flight":1,"peak_per_second":2,…}
//! curl http://ADDR/emulator/requests   # every request received, in order
//! ```
//!
//! # Traffic
//!
//! For rate-limit checks the emulator keeps the arrival time of every token request (the
//! newest 100 000, [`Emulator::token_request_times`]), the most that arrived within any window
//! ([`Emulator::peak_token_requests`], [`busiest_window`]) and how many token requests it was
//! answering at once ([`Emulator::in_flight_token_requests`],
//! [`Emulator::peak_in_flight_token_requests`]; a request stops counting when it is answered or
//! its client goes away).
//!
//! Fault JSON: `{"fault":"none"}`, `{"fault":"status","status":N[,"retry_after":S]}`,
//! `{"fault":"hang"}`, `{"fault":"slow","millis":N}`, `{"fault":"malformed_json"}`,
//! `{"fault":"date_string_expiry"}`, `{"fault":"opaque_token"}`.

#![warn(missing_docs, unreachable_pub)]
// The request checks return the refusal response itself as the error; it is built at most once
// per refused request, so boxing it would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "the Err variant is the HTTP response to send"
)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use azgate_msi::request::Query;
use azgate_msi::server::{self as http_server, json_response};
use azgate_msi::us_date::format_us_date;

/// The tenant every emulated token belongs to.
pub const TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The subscription the emulated identities live in.
pub const SUBSCRIPTION_ID: &str = "00000000-0000-0000-0000-00000000a2a7";
/// `xms_mirid` of tokens issued for the system-assigned identity (no selector).
pub const SYSTEM_ASSIGNED_RESOURCE_ID: &str = "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourcegroups/azgate-emulator/providers/Microsoft.Compute/virtualMachines/emulator-vm";
/// The `X-IDENTITY-HEADER` value the App Service endpoint expects unless changed.
pub const DEFAULT_IDENTITY_HEADER: &str = "azgate-emulator-identity-header";
use azgate_msi::protocol::{APP_SERVICE_API_VERSION, IMDS_INFO_PATH};
pub use azgate_msi::protocol::{APP_SERVICE_TOKEN_PATH, IMDS_TOKEN_PATH};

/// The api-versions IMDS accepts on the identity endpoint (its service-wide list).
const IMDS_API_VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-22",
    "2022-03-01",
    "2022-07-15",
    "2022-08-01",
    "2023-07-01",
    "2023-11-15",
    "2024-03-15",
    "2024-07-17",
    "2025-04-07",
];
/// A long-running `azgate-imds-emulator` must not grow without bound.
const MAX_RECORDED_REQUESTS: usize = 10_000;
/// Token-request arrival times kept (8 bytes each), enough for hours of a rate-limited client.
const MAX_RECORDED_ARRIVALS: usize = 100_000;
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);
/// `Retry-After` sent with `Fault::Status(429)`: MSAL's default throttle window.
const DEFAULT_RETRY_AFTER_SECONDS: u64 = 5;

/// How the emulator answers token requests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Issue tokens normally.
    None,
    /// Answer with this status and the IMDS error body for it; a 429 carries
    /// `Retry-After: 5`.
    Status(u16),
    /// Answer with this status, its IMDS error body and `Retry-After: <seconds>`.
    StatusRetryAfter(u16, u64),
    /// Never answer (the connection stays open until the client gives up or the emulator stops).
    Hang,
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// Answer 200 with a truncated JSON body.
    MalformedJson,
    /// Answer normally but put `expires_on` as an App-Service-on-Linux date string
    /// (`"11/25/2026 14:37:29 +00:00"`) instead of epoch seconds.
    DateStringExpiry,
    /// Answer normally but with an access token that is not a JWT.
    OpaqueToken,
}

/// One request the emulator received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query exactly as received.
    pub path_and_query: String,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, lossily decoded as UTF-8 (form posts to the authority endpoint).
    pub body: String,
    /// When it arrived, on tokio's clock (so paused-clock tests can measure gaps).
    pub received_at: tokio::time::Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let (_, query) = self.path_and_query.split_once('?')?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or_default()
    }
}

/// A running emulator. Clones share state; serving stops when the last clone is dropped or
/// [`Emulator::shutdown`] is called.
#[derive(Clone, Debug)]
pub struct Emulator {
    state: Arc<State>,
    stop: Arc<watch::Sender<bool>>,
    local_addr: SocketAddr,
}

#[derive(Debug)]
struct State {
    token_requests: AtomicU64,
    issued_tokens: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    control: Mutex<Control>,
    stop: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Control {
    fault: Fault,
    queued_faults: VecDeque<Fault>,
    /// Timed faults, each with the instant it ends; the front one applies until then.
    schedule: VecDeque<(tokio::time::Instant, Fault)>,
    token_lifetime: Duration,
    identity_header: String,
    requests: VecDeque<RecordedRequest>,
    token_arrivals: VecDeque<tokio::time::Instant>,
}

impl Control {
    /// The fault for the next token request: a queued one-shot fault, else the current
    /// scheduled step (dropping steps that have ended), else the standing fault.
    fn next_fault(&mut self, now: tokio::time::Instant) -> Fault {
        if let Some(fault) = self.queued_faults.pop_front() {
            return fault;
        }
        while self
            .schedule
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            self.schedule.pop_front();
        }
        match self.schedule.front() {
            Some((_, fault)) => fault.clone(),
            None => self.fault.clone(),
        }
    }
}

/// Counts a token request as in flight until it is dropped: answered, or abandoned because
/// its client went away (the server drops the handler with the connection).
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The most of `times` (in any order) that fall within one `window`: the largest number of
/// arrivals whose latest is less than `window` after their earliest. With a rate limit of
/// `n` starts per `window`, a compliant client never exceeds `n`.
pub fn busiest_window(times: &[tokio::time::Instant], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut busiest = 0;
    let mut first = 0;
    for (last, at) in sorted.iter().enumerate() {
        while at.duration_since(sorted[first]) >= window {
            first += 1;
        }
        busiest = busiest.max(last - first + 1);
    }
    busiest
}

/// Which endpoint a token request came in on; it decides the request checks and the response
/// shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Imds,
    AppService,
    Authority,
}

/// The identity a token is issued for.
struct Identity {
    client_id: String,
    object_id: String,
    resource_id: String,
    /// The `object_id` or `msi_res_id` selector as requested, which IMDS echoes back.
    echoed_selector: Option<(String, String)>,
}

// === impl Emulator ===

impl Emulator {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves on the current tokio runtime.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let emulator = Self::unbound(local_addr);
        let handler = Arc::new(EmulatorHandler(Arc::clone(&emulator.state)));
        tokio::spawn(http_server::serve(
            listener,
            handler,
            emulator.stop.subscribe(),
        ));
        Ok(emulator)
    }

    /// An emulator that listens nowhere; drive it with [`Emulator::handle`] (in-memory tests).
    pub fn in_memory() -> Emulator {
        Self::unbound(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    fn unbound(local_addr: SocketAddr) -> Emulator {
        let (stop, stop_receiver) = watch::channel(false);
        Emulator {
            state: Arc::new(State {
                token_requests: AtomicU64::new(0),
                issued_tokens: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                peak_in_flight: AtomicUsize::new(0),
                control: Mutex::new(Control {
                    fault: Fault::None,
                    queued_faults: VecDeque::new(),
                    schedule: VecDeque::new(),
                    token_lifetime: DEFAULT_TOKEN_LIFETIME,
                    identity_header: DEFAULT_IDENTITY_HEADER.to_owned(),
                    requests: VecDeque::new(),
                    token_arrivals: VecDeque::new(),
                }),
                stop: stop_receiver,
            }),
            stop: Arc::new(stop),
            local_addr,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`, the value for `AZURE_POD_IDENTITY_AUTHORITY_HOST` or an authority host.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The full IMDS token URL.
    pub fn imds_token_url(&self) -> String {
        format!("{}{IMDS_TOKEN_PATH}", self.base_url())
    }

    /// The App Service `IDENTITY_ENDPOINT` value.
    pub fn identity_endpoint(&self) -> String {
        format!("{}{APP_SERVICE_TOKEN_PATH}", self.base_url())
    }

    /// Token requests received on any token path (IMDS, App Service, authority), whatever the
    /// outcome, including faults and protocol errors.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Tokens actually issued (successful token responses).
    pub fn issued_tokens(&self) -> u64 {
        self.state.issued_tokens.load(Ordering::SeqCst)
    }

    /// The requests received (token paths and others, not the admin API), in order; the
    /// newest 10 000 are kept.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.control().requests.iter().cloned().collect()
    }

    /// Sets the behaviour for subsequent token requests (after any queued one-shot faults).
    pub fn set_fault(&self, fault: Fault) {
        self.state.control().fault = fault;
    }

    /// Queues one-shot faults: the next token requests take these in order, then the fault
    /// from [`Emulator::set_fault`] applies again.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.control().queued_faults.extend(faults);
    }

    /// Faults by time: each `(duration, fault)` step applies for its duration, the first from
    /// now, the next when it ends; after the last the standing fault ([`Emulator::set_fault`])
    /// applies again. Replaces a schedule in progress; an empty one cancels it. Queued one-shot
    /// faults still come first. Returns when the schedule ends (tokio's clock).
    pub fn schedule_faults(
        &self,
        steps: impl IntoIterator<Item = (Duration, Fault)>,
    ) -> tokio::time::Instant {
        self.state.set_schedule(steps)
    }

    /// Arrival times of token requests (any token path, any outcome), oldest first; the
    /// newest 100 000 are kept.
    pub fn token_request_times(&self) -> Vec<tokio::time::Instant> {
        self.state
            .control()
            .token_arrivals
            .iter()
            .copied()
            .collect()
    }

    /// The most token requests that arrived within any `window` (see [`busiest_window`]).
    pub fn peak_token_requests(&self, window: Duration) -> usize {
        busiest_window(&self.token_request_times(), window)
    }

    /// Token requests being answered now (hanging and slow ones included).
    pub fn in_flight_token_requests(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most token requests answered at once since start (or since
    /// [`Emulator::reset_traffic`]).
    pub fn peak_in_flight_token_requests(&self) -> usize {
        self.state.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Forgets the recorded arrival times and restarts the in-flight peak from now.
    pub fn reset_traffic(&self) {
        self.state.reset_traffic();
    }

    /// Restarts the in-flight peak from the number in flight now (arrival times are kept).
    pub fn reset_peak_in_flight(&self) {
        self.state.reset_peak_in_flight();
    }

    /// Lifetime of issued tokens (default 24 h: `expires_in` ≈ 86399).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.control().token_lifetime = lifetime;
    }

    /// The `X-IDENTITY-HEADER` value the App Service endpoint requires.
    pub fn identity_header(&self) -> String {
        self.state.control().identity_header.clone()
    }

    /// Changes the `X-IDENTITY-HEADER` value (App Service rotates it).
    pub fn set_identity_header(&self, value: &str) {
        value.clone_into(&mut self.state.control().identity_header);
    }

    /// Stops serving; connections in progress (including hanging ones) are closed.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Answers one request without a socket, exactly as the HTTP server would.
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        self.state.handle(request).await
    }
}

struct EmulatorHandler(Arc<State>);

impl http_server::Handler for EmulatorHandler {
    async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        self.0.handle(request).await
    }
}

// === impl State ===

impl State {
    fn control(&self) -> MutexGuard<'_, Control> {
        // A panic while holding this lock leaves only counters and recordings behind, which
        // stay meaningful, so a poisoned lock is used as is.
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_schedule(
        &self,
        steps: impl IntoIterator<Item = (Duration, Fault)>,
    ) -> tokio::time::Instant {
        let mut end = tokio::time::Instant::now();
        let schedule = steps
            .into_iter()
            .map(|(duration, fault)| {
                end += duration;
                (end, fault)
            })
            .collect();
        self.control().schedule = schedule;
        end
    }

    fn reset_traffic(&self) {
        self.control().token_arrivals.clear();
        self.reset_peak_in_flight();
    }

    fn reset_peak_in_flight(&self) {
        self.peak_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        let path = request.uri().path().to_owned();
        if let Some(admin) = path.strip_prefix("/emulator/") {
            return self.admin(admin, &request);
        }
        self.record(&request);
        let endpoint = if path.eq_ignore_ascii_case(IMDS_TOKEN_PATH) {
            Endpoint::Imds
        } else if path.eq_ignore_ascii_case(APP_SERVICE_TOKEN_PATH) {
            Endpoint::AppService
        } else if path.ends_with("/oauth2/v2.0/token") {
            Endpoint::Authority
        } else if path == IMDS_INFO_PATH {
            return self.identity_info(&request);
        } else {
            return imds_error(StatusCode::NOT_FOUND, "not_found", "Path not found");
        };
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::enter(self);

        let fault = {
            let now = tokio::time::Instant::now();
            let mut control = self.control();
            if control.token_arrivals.len() >= MAX_RECORDED_ARRIVALS {
                control.token_arrivals.pop_front();
            }
            control.token_arrivals.push_back(now);
            control.next_fault(now)
        };
        match fault {
            Fault::Hang => {
                let mut stop = self.stop.clone();
                http_server::stopped(&mut stop).await;
                return imds_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "emulator stopped",
                );
            }
            Fault::Slow(delay) => tokio::time::sleep(delay).await,
            _ => {}
        }

        let checked = match endpoint {
            Endpoint::Imds => check_imds_request(&request),
            Endpoint::AppService => self.check_app_service_request(&request),
            Endpoint::Authority => check_authority_request(&request),
        };
        let (identity, resource) = match checked {
            Ok(checked) => checked,
            Err(response) => return response,
        };

        match fault {
            Fault::Status(status) => status_fault(status, None),
            Fault::StatusRetryAfter(status, seconds) => status_fault(status, Some(seconds)),
            Fault::MalformedJson => {
                json_response(StatusCode::OK, r#"{"access_token":"eyJ0eXAiOiJKV1Qi"#)
            }
            fault => self.issue(endpoint, &identity, &resource, &fault),
        }
    }

    fn record(&self, request: &Request<Bytes>) {
        let recorded = RecordedRequest {
            method: request.method().to_string(),
            path_and_query: request
                .uri()
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default(),
            headers: request
                .headers()
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(request.body()).into_owned(),
            received_at: tokio::time::Instant::now(),
        };
        let mut control = self.control();
        if control.requests.len() >= MAX_RECORDED_REQUESTS {
            control.requests.pop_front();
        }
        control.requests.push_back(recorded);
    }

    fn check_app_service_request(
        &self,
        request: &Request<Bytes>,
    ) -> Result<(Identity, String), Response<Bytes>> {
        if request.method() != Method::GET {
            return Err(app_service_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "Only GET is supported",
            ));
        }
        let expected = self.control().identity_header.clone();
        let presented = request
            .headers()
            .get("x-identity-header")
            .map(|value| value.as_bytes());
        if presented != Some(expected.as_bytes()) {
            return Err(app_service_error(
                StatusCode::UNAUTHORIZED,
                "X-IDENTITY-HEADER is missing or invalid",
            ));
        }
        let query = Query::parse(request.uri().query()).map_err(|name| {
            app_service_error(
                StatusCode::BAD_REQUEST,
                &format!("duplicate query parameter {name}"),
            )
        })?;
        if query.first("api-version") != Some(APP_SERVICE_API_VERSION) {
            return Err(app_service_error(
                StatusCode::BAD_REQUEST,
                "api-version must be 2019-08-01",
            ));
        }
        let Some(resource) = query.first("resource").filter(|r| !r.is_empty()) else {
            return Err(app_service_error(
                StatusCode::BAD_REQUEST,
                "resource is required",
            ));
        };
        let selectors = [
            ("client_id", query.first("client_id")),
            (
                "object_id",
                query.first("object_id").or(query.first("principal_id")),
            ),
            ("msi_res_id", query.first("mi_res_id")),
        ];
        let identity = select_identity(&selectors)
            .map_err(|message| app_service_error(StatusCode::BAD_REQUEST, message))?;
        Ok((identity, resource.to_owned()))
    }

    fn identity_info(&self, request: &Request<Bytes>) -> Response<Bytes> {
        if let Err(response) = check_imds_headers(request) {
            return response;
        }
        json_response(StatusCode::OK, json!({ "tenantId": TENANT_ID }).to_string())
    }

    fn issue(
        &self,
        endpoint: Endpoint,
        identity: &Identity,
        resource: &str,
        fault: &Fault,
    ) -> Response<Bytes> {
        let serial = self.issued_tokens.fetch_add(1, Ordering::SeqCst) + 1;
        let lifetime = self.control().token_lifetime.as_secs();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let expires_on = now + lifetime;
        let access_token = if *fault == Fault::OpaqueToken {
            format!("opaque-emulator-token-{serial}")
        } else {
            jwt(identity, resource, now, expires_on, serial)
        };
        let expires_on_text = if *fault == Fault::DateStringExpiry {
            format_us_date(i64::try_from(expires_on).unwrap_or(i64::MAX))
        } else {
            expires_on.to_string()
        };
        let body = match endpoint {
            // IMDS sends every number as a JSON string.
            Endpoint::Imds => {
                let mut body = json!({
                    "access_token": access_token,
                    "refresh_token": "",
                    "expires_in": lifetime.to_string(),
                    "expires_on": expires_on_text,
                    "ext_expires_in": lifetime.to_string(),
                    "not_before": now.to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                    "client_id": identity.client_id,
                });
                if let (Some(object), Some((name, value))) =
                    (body.as_object_mut(), &identity.echoed_selector)
                {
                    object.insert(name.clone(), value.clone().into());
                }
                body
            }
            // App Service 2019-08-01: no expires_in, epoch string expires_on.
            Endpoint::AppService => json!({
                "access_token": access_token,
                "expires_on": expires_on_text,
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }),
            // Entra v2 sends numbers as numbers and no expires_on.
            Endpoint::Authority => json!({
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": access_token,
            }),
        };
        json_response(StatusCode::OK, body.to_string())
    }
}

mod admin;
mod checks;

use checks::{
    app_service_error, check_authority_request, check_imds_headers, check_imds_request, imds_error,
    jwt, select_identity, status_fault,
};

#[cfg(test)]
mod tests;
