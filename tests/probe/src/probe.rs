//! The probe's contexts. One root context (queue registration, ticks, queue deliveries) and one
//! HTTP context per request, which runs the scenario named by `x-probe`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls as hc;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};
use serde_json::{Value, json};

use crate::raw;

mod observe;
mod stateless;

use observe::*;
use stateless::*;

/// The queue the root context registers in `on_vm_start`.
const ROOT_QUEUE: &str = "probe_q";
/// The queue a request registers.
const STREAM_QUEUE: &str = "probe_q2";
/// Ticks counted before the probe switches its tick off again.
const TICK_LIMIT: u64 = 5;
/// The emulator's token path; the runner makes it slow or hang with emulator faults.
const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://probe";

pub fn register() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ProbeRoot {
            state: Rc::new(RootState::default()),
        })
    });
}

/// What the root context learnt, shared with the request contexts of the same VM.
#[derive(Default)]
struct RootState {
    config: RefCell<Option<String>>,
    vm_config_size: Cell<usize>,
    root_queue: Cell<Option<u32>>,
    stream_queue: Cell<Option<u32>>,
    register_status: RefCell<String>,
}

struct ProbeRoot {
    state: Rc<RootState>,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        self.state.vm_config_size.set(vm_configuration_size);
        match hc::register_shared_queue(ROOT_QUEUE) {
            Ok(id) => {
                self.state.root_queue.set(Some(id));
                *self.state.register_status.borrow_mut() = "Ok".into();
            }
            Err(status) => *self.state.register_status.borrow_mut() = format!("{status:?}"),
        }
        increment("probe.vm_starts");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = hc::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
        *self.state.config.borrow_mut() = Some(match config {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(None) => "<none>".into(),
            Err(status) => format!("<{status:?}>"),
        });
        true
    }

    fn on_tick(&mut self) {
        let ticks = increment("probe.ticks");
        if ticks >= TICK_LIMIT {
            let status = hc::set_tick_period(Duration::ZERO);
            set_json("probe.tick_stop", &json!(status_text(status)));
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let name = if Some(queue_id) == self.state.root_queue.get() {
            ROOT_QUEUE
        } else if Some(queue_id) == self.state.stream_queue.get() {
            STREAM_QUEUE
        } else {
            "unknown"
        };
        let mut delivered = 0;
        loop {
            match hc::dequeue_shared_queue(queue_id) {
                Ok(Some(message)) => {
                    delivered += 1;
                    append(
                        "probe.queue_log",
                        json!(format!("{name}:{}", text(&message))),
                    );
                }
                Ok(None) => {
                    if delivered == 0 {
                        append("probe.queue_log", json!(format!("{name}:<empty>")));
                    }
                    break;
                }
                Err(status) => {
                    append("probe.queue_log", json!(format!("{name}:<{status:?}>")));
                    break;
                }
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeStream {
            root: self.state.clone(),
            scenario: String::new(),
            life: None,
            events: vec!["create".into()],
            observed: json!({}),
            cas: None,
            body: Vec::new(),
            phases: json!({}),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct ProbeStream {
    root: Rc<RootState>,
    scenario: String,
    /// `x-probe-life`: the name under which this stream's callbacks are recorded.
    life: Option<String>,
    events: Vec<String>,
    /// Observations made before a call-out, completed when it answers.
    observed: Value,
    /// The counter value and cas read before the call-out (`cas` scenario).
    cas: Option<(u64, Option<u32>)>,
    body: Vec<u8>,
    /// What each callback could reach (`phases` scenario).
    phases: Value,
}

impl ProbeStream {
    fn event(&mut self, event: impl Into<String>) {
        self.events.push(event.into());
        if let Some(life) = &self.life {
            set_json(&format!("probe.life.{life}"), &json!(self.events));
        }
    }

    /// Records which header maps and properties the host offers in this callback
    /// (`phases` scenario), under `probe.phases`.
    fn phase(&mut self, name: &str) {
        if self.scenario != "phases" {
            return;
        }
        let status = |(status, _): (u32, Vec<u8>)| status;
        let pairs = |(status, count): (u32, u32)| json!([status, count > 0]);
        let property = |path: Vec<&str>, shape: Shape| match hc::get_property(path) {
            Ok(value) => json!(value.as_deref().map(|v| shaped(v, shape))),
            Err(status) => json!(format!("<{status:?}>")),
        };
        self.phases[name] = json!({
            "request_get": status(raw::get_header(0, "x-probe")),
            "request_pairs": pairs(raw::pair_count(0)),
            "request_replace": raw::replace_header(0, "x-probe-phase", name),
            "response_get": status(raw::get_header(2, ":status")),
            "response_pairs": pairs(raw::pair_count(2)),
            "response_replace": raw::replace_header(2, "x-probe-phase", name),
            "call_get": status(raw::get_header(6, ":status")),
            "call_pairs": pairs(raw::pair_count(6)),
            "request.path": property(vec!["request", "path"], Shape::Text),
            "request.headers.x-probe": property(vec!["request", "headers", "x-probe"], Shape::Text),
            "request.id": property(vec!["request", "id"], Shape::Present),
            "request.protocol": property(vec!["request", "protocol"], Shape::Text),
            "request.time": property(vec!["request", "time"], Shape::Present),
            "response.code": property(vec!["response", "code"], Shape::Int),
            "source.address": property(vec!["source", "address"], Shape::Host),
        });
        set_json("probe.phases", &self.phases);
    }

    fn header(&self, name: &str) -> Option<String> {
        hc::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn run(&mut self) -> Action {
        match self.scenario.as_str() {
            "ping" => answer(json!({"ok": true})),
            "headers" => answer(self.headers()),
            "headers_mutate" => answer(self.headers_mutate()),
            "headers_set_map" => answer(headers_set_map()),
            "body" => self.body_start(),
            "local_response" => local_response(),
            "local_response_empty" => send(403, vec![], None),
            "call_ok" => self.call(
                "azgate_msi",
                "/metadata/identity/info?api-version=2018-02-01",
                true,
                Duration::from_secs(5),
            ),
            "call_timeout" => self.call("azgate_msi", TOKEN_PATH, true, Duration::from_millis(300)),
            "call_reset" => self.call("probe_reset", "/", true, Duration::from_secs(5)),
            "call_refused" => self.call("probe_refused", "/", true, Duration::from_secs(5)),
            "call_unknown_cluster" => {
                self.call("no_such_cluster", "/", true, Duration::from_secs(5))
            }
            "call_no_authority" => self.call("azgate_msi", "/", false, Duration::from_secs(5)),
            "shared" => answer(shared()),
            "cas" => self.cas_start(),
            "shared_write" => {
                let key = self.header("x-probe-key").unwrap_or_default();
                let value = self.header("x-probe-value").unwrap_or_default();
                let status = hc::set_shared_data(&key, Some(value.as_bytes()), None);
                answer(json!({"set": result_text(status)}))
            }
            "shared_read" => {
                let key = self.header("x-probe-key").unwrap_or_default();
                let (value, cas) = hc::get_shared_data(&key).unwrap_or((None, None));
                answer(json!({"value": value.as_deref().map(text), "has_cas": cas.is_some()}))
            }
            "queue" => answer(self.queue()),
            "queue_read" => answer(json!({"log": get_json("probe.queue_log")})),
            "tick_start" => {
                let status = hc::set_tick_period(Duration::from_millis(20));
                answer(json!({"set_tick_period": status_text(status)}))
            }
            "tick_read" => answer(json!({
                "ticks": get_json("probe.ticks"),
                "stop": get_json("probe.tick_stop"),
            })),
            "metrics" => answer(metrics()),
            "properties" => answer(properties()),
            "misc" => answer(self.misc()),
            "lifecycle_local" => answer(json!({"ok": true})),
            "lifecycle_call" => self.call(
                "azgate_msi",
                "/metadata/identity/info?api-version=2018-02-01",
                true,
                Duration::from_secs(5),
            ),
            "lifecycle_forward" => forward(),
            // The upstream's certificate does not name this host: the gateway itself answers.
            "upstream_error" => {
                let _ = hc::set_map_value(
                    MapType::HttpRequestHeaders,
                    ":authority",
                    Some("not-in-certificate.management.azure.com"),
                );
                Action::Continue
            }
            "phases" => {
                self.phase("request_headers");
                let _ = hc::set_map_value(
                    MapType::HttpRequestHeaders,
                    ":authority",
                    Some("management.azure.com"),
                );
                self.call(
                    "azgate_msi",
                    "/metadata/identity/info?api-version=2018-02-01",
                    true,
                    Duration::from_secs(5),
                )
            }
            "call_resume" => self.call(
                "azgate_msi",
                "/metadata/identity/info?api-version=2018-02-01",
                true,
                Duration::from_secs(5),
            ),
            // The runner hangs the emulator and gives up before this timeout.
            "call_abort" => self.call("azgate_msi", TOKEN_PATH, true, Duration::from_millis(1500)),
            "lifecycle_read" => {
                let name = self.header("x-probe-target").unwrap_or_default();
                answer(json!({"events": get_json(&format!("probe.life.{name}"))}))
            }
            "trap" => panic!("probe: trap scenario"),
            other => answer(json!({"error": format!("unknown scenario {other:?}")})),
        }
    }

    // === headers ===

    fn headers(&self) -> Value {
        let pairs = hc::get_map(MapType::HttpRequestHeaders).unwrap_or_default();
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        let probe_names: Vec<&str> = names
            .iter()
            .copied()
            .filter(|k| k.starts_with("x-") && *k != "x-forwarded-proto" && *k != "x-request-id")
            .collect();
        let mut all: Vec<&str> = names.clone();
        all.sort_unstable();
        all.dedup();
        let value = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let authority = value(":authority").map(|a| strip_port(&a));
        json!({
            "get_lower": self.header("x-probe-case"),
            "get_upper_key": self.header("X-Probe-Case"),
            "get_repeated": self.header("x-rep"),
            "get_empty_value": self.header("x-empty"),
            "get_missing": self.header("x-missing"),
            "xfcc": self.header("x-forwarded-client-cert"),
            "pairs_probe_names_in_order": probe_names,
            "pairs_repeated_values": pairs.iter().filter(|(k, _)| k == "x-rep").map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
            "pairs_all_names": all,
            "pseudo_in_order": names.iter().filter(|k| k.starts_with(':')).collect::<Vec<_>>(),
            ":method": value(":method"),
            ":path": value(":path"),
            ":scheme": value(":scheme"),
            ":authority_host": authority,
            "get_pseudo_path": self.header(":path"),
            "any_uppercase_key": names.iter().any(|k| k.chars().any(|c| c.is_ascii_uppercase())),
            "protocol": hc::get_property(vec!["request", "protocol"]).ok().flatten().map(|p| text(&p)),
        })
    }

    fn headers_mutate(&self) -> Value {
        let map = MapType::HttpRequestHeaders;
        let mut steps = serde_json::Map::new();
        let mut step = |name: &str, status: Result<(), Status>| {
            steps.insert(name.into(), json!(result_text(status)));
        };
        step("add_1", hc::add_map_value(map, "x-added", "1"));
        step("add_2", hc::add_map_value(map, "x-added", "2"));
        step("add_upper_key", hc::add_map_value(map, "X-Upper-Add", "U"));
        step(
            "add_empty_value",
            hc::add_map_value(map, "x-added-empty", ""),
        );
        step(
            "replace_repeated",
            hc::set_map_value(map, "x-rep", Some("c")),
        );
        step(
            "replace_missing",
            hc::set_map_value(map, "x-new", Some("n")),
        );
        step("remove_present", hc::remove_map_value(map, "x-empty"));
        step("remove_missing", hc::remove_map_value(map, "x-never-there"));
        step(
            "replace_path",
            hc::set_map_value(map, ":path", Some("/rewritten")),
        );
        let pairs = hc::get_map(map).unwrap_or_default();
        let values = |key: &str| -> Vec<String> {
            pairs
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .collect()
        };
        json!({
            "steps": steps,
            "x-added": values("x-added"),
            "get_x-added": self.header("x-added"),
            "x-upper-add": values("x-upper-add"),
            "X-Upper-Add": values("X-Upper-Add"),
            "x-added-empty": values("x-added-empty"),
            "get_x-added-empty": self.header("x-added-empty"),
            "x-rep": values("x-rep"),
            "x-new": values("x-new"),
            "x-empty": values("x-empty"),
            ":path": values(":path"),
        })
    }

    // === body ===

    fn body_start(&mut self) -> Action {
        self.observed = json!({
            "body_at_headers": buffer_text(hc::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)),
        });
        // Unanswered, the request goes to the fake Azure upstream (so a host without body
        // callbacks answers something comparable instead of failing).
        let _ = hc::set_map_value(
            MapType::HttpRequestHeaders,
            ":authority",
            Some("management.azure.com"),
        );
        Action::Continue
    }

    fn body_chunk(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.scenario != "body" {
            return Action::Continue;
        }
        let chunk = hc::get_buffer(BufferType::HttpRequestBody, 0, size);
        if let Ok(Some(bytes)) = &chunk {
            self.body.extend_from_slice(bytes);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = BufferType::HttpRequestBody;
        let whole = hc::get_buffer(body, 0, usize::MAX);
        let slice = hc::get_buffer(body, 6, 5);
        let past_end = hc::get_buffer(body, size + 10, 5);
        let replaced = hc::set_buffer(body, 0, 5, b"HELLO");
        let after = hc::get_buffer(body, 0, usize::MAX);
        self.observed["last_chunk_size"] = json!(size);
        self.observed["whole"] = buffer_text(whole);
        self.observed["slice_6_5"] = buffer_text(slice);
        self.observed["past_end"] = buffer_text(past_end);
        self.observed["set_prefix"] = json!(result_text(replaced));
        self.observed["after_set"] = buffer_text(after);
        answer(self.observed.take())
    }

    // === call-outs ===

    fn call(&mut self, cluster: &str, path: &str, authority: bool, timeout: Duration) -> Action {
        let mut headers = vec![(":method", "GET"), (":path", path), ("metadata", "true")];
        if authority {
            headers.push((":authority", "169.254.169.254"));
        }
        match hc::dispatch_http_call(cluster, headers, None, vec![], timeout) {
            Ok(_) => {
                self.observed = json!({"dispatch": "Ok"});
                Action::Pause
            }
            Err(status) => answer(json!({"dispatch": format!("{status:?}")})),
        }
    }

    fn call_response(&mut self, num_headers: usize, body_size: usize, num_trailers: usize) {
        if self.scenario == "phases" {
            self.phase("call_response");
            let resumed = hc::resume_http_request();
            self.phase("call_response_after_resume");
            self.phases["resume"] = json!(result_text(resumed));
            set_json("probe.phases", &self.phases);
            return;
        }
        if self.scenario == "call_resume" {
            // Change the paused request, then let it go on to the upstream.
            self.event("http_call_response");
            let map = MapType::HttpRequestHeaders;
            let status = hc::get_map_value(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
                .unwrap_or_default();
            let _ = hc::set_map_value(map, "x-probe-resumed", Some(&status));
            let _ = hc::set_map_value(map, ":authority", Some("management.azure.com"));
            let resumed = hc::resume_http_request();
            // After the resume, through a raw call: the SDK would panic on a refusal.
            let late = raw::replace_header(0, "x-probe-after-resume", "1");
            set_json(
                "probe.resume",
                &json!({"resume": result_text(resumed), "set_header_after_resume": late}),
            );
            return;
        }
        let mut observed = self.observed.take();
        observed["num_headers_zero"] = json!(num_headers == 0);
        observed["num_trailers"] = json!(num_trailers);
        observed["get_status"] = match hc::get_grpc_status() {
            Ok((code, message)) => json!([code, message]),
            Err(status) => json!(format!("<{status:?}>")),
        };
        if num_headers > 0 {
            let map = MapType::HttpCallResponseHeaders;
            let pairs = hc::get_map(map).unwrap_or_default();
            observed["num_headers_matches_pairs"] = json!(pairs.len() == num_headers);
            observed[":status"] = json!(hc::get_map_value(map, ":status").ok().flatten());
            observed["content-type"] = json!(hc::get_map_value(map, "content-type").ok().flatten());
            observed["get_missing"] = json!(hc::get_map_value(map, "x-missing").ok().flatten());
            let mut names: Vec<String> = pairs.into_iter().map(|(k, _)| k).collect();
            names.sort_unstable();
            observed["header_names"] = json!(names);
        }
        let body = BufferType::HttpCallResponseBody;
        observed["body_size"] = json!(body_size);
        observed["body"] = buffer_text(hc::get_buffer(body, 0, body_size));
        observed["body_slice_1_4"] = buffer_text(hc::get_buffer(body, 1, 4));
        if self.scenario == "cas" {
            self.cas_finish(&mut observed);
        }
        self.event("http_call_response");
        answer(observed);
    }

    // === shared data ===

    fn cas_start(&mut self) -> Action {
        let key = self.header("x-probe-key").unwrap_or_default();
        let (value, cas) = hc::get_shared_data(&key).unwrap_or((None, None));
        self.cas = Some((value.as_deref().map(number).unwrap_or(0), cas));
        // Hold the stale cas until the (slowed) call-out answers, so that concurrent requests
        // really contend.
        self.call("azgate_msi", TOKEN_PATH, true, Duration::from_secs(10))
    }

    fn cas_finish(&mut self, observed: &mut Value) {
        let key = self.header("x-probe-key").unwrap_or_default();
        let (mut value, mut cas) = self.cas.take().unwrap_or((0, None));
        let (mut mismatches, mut others) = (0u32, Vec::new());
        let mut written = None;
        for _ in 0..1000 {
            match hc::set_shared_data(&key, Some((value + 1).to_string().as_bytes()), cas) {
                Ok(()) => {
                    written = Some(value + 1);
                    break;
                }
                Err(Status::CasMismatch) => mismatches += 1,
                Err(status) => others.push(format!("{status:?}")),
            }
            let (now, now_cas) = hc::get_shared_data(&key).unwrap_or((None, None));
            value = now.as_deref().map(number).unwrap_or(0);
            cas = now_cas;
        }
        observed["cas_mismatches"] = json!(mismatches);
        observed["cas_other_errors"] = json!(others);
        observed["cas_written"] = json!(written);
    }

    // === queues ===

    fn queue(&mut self) -> Value {
        let vm_id = hc::get_property(vec!["plugin_vm_id"])
            .ok()
            .flatten()
            .map(|b| text(&b))
            .unwrap_or_default();
        let root_queue = self.root.root_queue.get();
        let resolved = hc::resolve_shared_queue(&vm_id, ROOT_QUEUE);
        let enqueue = |id: u32, message: &str| {
            result_text(hc::enqueue_shared_queue(id, Some(message.as_bytes())))
        };
        let root_id = root_queue.unwrap_or(u32::MAX);
        let registered = hc::register_shared_queue(STREAM_QUEUE);
        if let Ok(id) = registered {
            self.root.stream_queue.set(Some(id));
        }
        let stream_id = registered.unwrap_or(u32::MAX);
        json!({
            "register_at_vm_start": *self.root.register_status.borrow(),
            "resolve_same_id": either(resolved.map(|id| id == root_queue)),
            "resolve_unknown": resolved_text(hc::resolve_shared_queue(&vm_id, "no_such_queue")),
            "resolve_other_vm": resolved_text(hc::resolve_shared_queue("no_such_vm", ROOT_QUEUE)),
            "enqueue_1": enqueue(root_id, "m1"),
            "enqueue_2": enqueue(root_id, "m2"),
            "enqueue_unknown_id": enqueue(987_654, "x"),
            "dequeue_unknown_id": dequeue_text(hc::dequeue_shared_queue(987_654)),
            "register_in_request_new_id": either(registered.map(|id| Some(id) != root_queue)),
            "register_again_same_id": either(hc::register_shared_queue(STREAM_QUEUE).map(|id| id == stream_id)),
            "enqueue_own": enqueue(stream_id, "n1"),
            "dequeue_own": dequeue_text(hc::dequeue_shared_queue(stream_id)),
            "dequeue_own_again": dequeue_text(hc::dequeue_shared_queue(stream_id)),
        })
    }

    // === misc ===

    fn misc(&self) -> Value {
        let now = hc::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let client_now: Option<u64> = self.header("x-probe-now").and_then(|v| v.parse().ok());
        json!({
            "config_at_configure": *self.root.config.borrow(),
            "config_at_request": buffer_text(hc::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)),
            "vm_config_size": self.root.vm_config_size.get(),
            "log_level": either(hc::get_log_level().map(|l| format!("{l:?}"))),
            "log_info": result_text(hc::log(LogLevel::Info, "probe: info line")),
            "log_critical": result_text(hc::log(LogLevel::Critical, "probe: critical line")),
            "time_within_10s_of_client": match (now, client_now) {
                (Some(now), Some(client)) => json!(now.abs_diff(client) <= 10),
                _ => json!(null),
            },
            "effective_context_unknown": result_text(hc::set_effective_context(999_999)),
        })
    }
}

impl Context for ProbeStream {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        self.call_response(num_headers, body_size, num_trailers);
    }

    fn on_done(&mut self) -> bool {
        self.phase("done");
        self.event("done");
        true
    }
}

impl HttpContext for ProbeStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.life = self.header("x-probe-life");
        self.event(format!("request_headers(eos={end_of_stream})"));
        self.scenario = self.header("x-probe").unwrap_or_default();
        self.run()
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(format!("request_body(eos={end_of_stream})"));
        self.body_chunk(body_size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.event(format!("response_headers(eos={end_of_stream})"));
        self.phase("response_headers");
        if self.scenario == "lifecycle_forward" {
            let map = MapType::HttpResponseHeaders;
            let seen = json!({
                ":status": hc::get_map_value(map, ":status").ok().flatten(),
                "x-fake-azure": hc::get_map_value(map, "x-fake-azure").ok().flatten(),
                "set": result_text(hc::set_map_value(map, "x-probe-set", Some("1"))),
            });
            let _ = hc::add_map_value(map, "x-probe-response", &seen.to_string());
        }
        if self.scenario.starts_with("local_response") || self.scenario == "upstream_error" {
            // The probe's own local reply passing through its response callback.
            let map = MapType::HttpResponseHeaders;
            let status = hc::get_map_value(map, ":status").ok().flatten();
            let seen = format!("status={status:?} eos={end_of_stream}");
            let _ = hc::add_map_value(map, "x-probe-encoded", &seen);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        self.event(format!("response_body(eos={end_of_stream})"));
        Action::Continue
    }

    fn on_log(&mut self) {
        self.phase("log");
        self.event("log");
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        self.event("delete");
    }
}
