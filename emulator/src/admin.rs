//! The admin API (`/emulator/...`): faults, schedules, lifetimes, statistics, recorded requests.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use azgate_msi::server::json_response;

use super::{DEFAULT_TOKEN_LIFETIME, Fault, State, busiest_window, imds_error};

impl State {
    pub(crate) fn admin(&self, command: &str, request: &Request<Bytes>) -> Response<Bytes> {
        let result = match (request.method().clone(), command) {
            (Method::GET, "stats") => {
                let arrivals: Vec<_> = self.control().token_arrivals.iter().copied().collect();
                Ok(json!({
                    "token_requests": self.token_requests.load(Ordering::SeqCst),
                    "issued_tokens": self.issued_tokens.load(Ordering::SeqCst),
                    "in_flight": self.in_flight.load(Ordering::SeqCst),
                    "peak_in_flight": self.peak_in_flight.load(Ordering::SeqCst),
                    "peak_per_second": busiest_window(&arrivals, Duration::from_secs(1)),
                }))
            }
            (Method::GET, "requests") => {
                let requests = self.control().requests.clone();
                Ok(Value::Array(
                    requests
                        .iter()
                        .map(|r| json!({"method": r.method, "path_and_query": r.path_and_query, "headers": r.headers}))
                        .collect(),
                ))
            }
            (Method::POST, "fault") => serde_json::from_slice::<FaultSpec>(request.body())
                .map_err(|error| error.to_string())
                .and_then(Fault::try_from)
                .map(|fault| {
                    self.control().fault = fault;
                    json!({"ok": true})
                }),
            (Method::POST, "faults") => serde_json::from_slice::<Vec<FaultSpec>>(request.body())
                .map_err(|error| error.to_string())
                .and_then(|specs| {
                    specs
                        .into_iter()
                        .map(Fault::try_from)
                        .collect::<Result<Vec<_>, _>>()
                })
                .map(|faults| {
                    self.control().queued_faults.extend(faults);
                    json!({"ok": true})
                }),
            (Method::POST, "schedule") => {
                serde_json::from_slice::<Vec<ScheduleStep>>(request.body())
                    .map_err(|error| error.to_string())
                    .and_then(|steps| {
                        steps
                            .into_iter()
                            .map(|step| {
                                Fault::try_from(step.fault)
                                    .map(|fault| (Duration::from_millis(step.for_ms), fault))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .map(|steps| {
                        self.set_schedule(steps);
                        json!({"ok": true})
                    })
            }
            (Method::POST, "token-lifetime") => {
                #[derive(Deserialize)]
                struct Lifetime {
                    seconds: u64,
                }
                serde_json::from_slice::<Lifetime>(request.body())
                    .map_err(|error| error.to_string())
                    .map(|lifetime| {
                        self.control().token_lifetime = Duration::from_secs(lifetime.seconds);
                        json!({"ok": true})
                    })
            }
            (Method::POST, "reset") => {
                let mut control = self.control();
                control.fault = Fault::None;
                control.queued_faults.clear();
                control.schedule.clear();
                control.requests.clear();
                control.token_lifetime = DEFAULT_TOKEN_LIFETIME;
                drop(control);
                self.reset_traffic();
                Ok(json!({"ok": true}))
            }
            _ => {
                return imds_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "unknown emulator admin path",
                );
            }
        };
        match result {
            Ok(body) => json_response(StatusCode::OK, body.to_string()),
            Err(message) => imds_error(StatusCode::BAD_REQUEST, "invalid_request", &message),
        }
    }
}

/// One step of the admin API's fault schedule: `{"for_ms": N, "fault": {…}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleStep {
    for_ms: u64,
    fault: FaultSpec,
}

/// The admin API's JSON form of a [`Fault`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    fault: String,
    status: Option<u16>,
    retry_after: Option<u64>,
    millis: Option<u64>,
}

impl TryFrom<FaultSpec> for Fault {
    type Error = String;

    fn try_from(spec: FaultSpec) -> Result<Fault, String> {
        Ok(match (spec.fault.as_str(), spec.status, spec.retry_after) {
            ("none", ..) => Fault::None,
            ("status", Some(status), None) => Fault::Status(status),
            ("status", Some(status), Some(seconds)) => Fault::StatusRetryAfter(status, seconds),
            ("status", None, _) => return Err("\"status\" fault needs a \"status\" code".into()),
            ("hang", ..) => Fault::Hang,
            ("slow", ..) => Fault::Slow(Duration::from_millis(spec.millis.unwrap_or(1000))),
            ("malformed_json", ..) => Fault::MalformedJson,
            ("date_string_expiry", ..) => Fault::DateStringExpiry,
            ("opaque_token", ..) => Fault::OpaqueToken,
            (other, ..) => return Err(format!("unknown fault {other:?}")),
        })
    }
}
