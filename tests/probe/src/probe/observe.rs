//! How the probe writes down what it saw: answers, value shapes, status and result texts, and
//! the shared-data log read back by later requests.

use proxy_wasm::hostcalls as hc;
use proxy_wasm::types::{Action, Bytes, LogLevel, Status};
use serde_json::{Value, json};

/// Answers the request with `observed` as JSON (status 200).
pub(super) fn answer(observed: Value) -> Action {
    let body = observed.to_string();
    send(
        200,
        vec![("content-type", "application/json")],
        Some(body.as_bytes()),
    )
}

pub(super) fn send(status: u32, headers: Vec<(&str, &str)>, body: Option<&[u8]>) -> Action {
    if let Err(error) = hc::send_http_response(status, headers, body) {
        let _ = hc::log(
            LogLevel::Error,
            &format!("probe: local response failed: {error:?}"),
        );
    }
    Action::Pause
}

pub(super) fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() + " (hex)",
    }
}

pub(super) fn number(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

pub(super) fn strip_port(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host.to_owned(),
    }
}

pub(super) fn status_text(status: Result<(), Status>) -> String {
    result_text(status)
}

pub(super) fn result_text(result: Result<(), Status>) -> String {
    match result {
        Ok(()) => "Ok".into(),
        Err(status) => format!("{status:?}"),
    }
}

pub(super) fn buffer_text(buffer: Result<Option<Bytes>, Status>) -> Value {
    match buffer {
        Ok(Some(bytes)) => json!(text(&bytes)),
        Ok(None) => json!(null),
        Err(status) => json!(format!("<{status:?}>")),
    }
}

pub(super) fn resolved_text(resolved: Result<Option<u32>, Status>) -> Value {
    match resolved {
        Ok(Some(_)) => json!("found"),
        Ok(None) => json!(null),
        Err(status) => json!(format!("<{status:?}>")),
    }
}

pub(super) fn dequeue_text(dequeued: Result<Option<Bytes>, Status>) -> Value {
    buffer_text(dequeued)
}

/// A result as JSON: the value, or the status as `<Name>`.
pub(super) fn either<T: Into<Value>>(result: Result<T, Status>) -> Value {
    match result {
        Ok(value) => value.into(),
        Err(status) => json!(format!("<{status:?}>")),
    }
}

pub(super) fn get_json(key: &str) -> Value {
    match hc::get_shared_data(key) {
        Ok((Some(bytes), _)) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

pub(super) fn set_json(key: &str, value: &Value) {
    let _ = hc::set_shared_data(key, Some(value.to_string().as_bytes()), None);
}

/// Increments a shared counter with CAS retries; returns the new value.
pub(super) fn increment(key: &str) -> u64 {
    for _ in 0..100 {
        let (value, cas) = hc::get_shared_data(key).unwrap_or((None, None));
        let next = value.as_deref().map(number).unwrap_or(0) + 1;
        if hc::set_shared_data(key, Some(next.to_string().as_bytes()), cas).is_ok() {
            return next;
        }
    }
    0
}

/// Appends `entry` to the JSON array at `key` with CAS retries.
pub(super) fn append(key: &str, entry: Value) {
    for _ in 0..100 {
        let (value, cas) = hc::get_shared_data(key).unwrap_or((None, None));
        let mut list: Vec<Value> = value
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        list.push(entry.clone());
        let text = Value::Array(list).to_string();
        if hc::set_shared_data(key, Some(text.as_bytes()), cas).is_ok() {
            return;
        }
    }
}
