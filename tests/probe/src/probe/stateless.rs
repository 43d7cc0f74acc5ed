//! Scenarios that need no stream state: each makes its host calls and answers at once.

use proxy_wasm::hostcalls as hc;
use proxy_wasm::types::{Action, MapType};
use serde_json::{Value, json};

use super::observe::{result_text, send, strip_port, text};
use crate::raw;

pub(super) fn headers_set_map() -> Value {
    let map = MapType::HttpRequestHeaders;
    let set = hc::set_map(
        map,
        vec![
            (":method", "GET"),
            (":path", "/replaced"),
            (":authority", "management.azure.com"),
            (":scheme", "https"),
            ("X-Only", "1"),
            ("x-probe", "headers_set_map"),
        ],
    );
    let pairs = hc::get_map(map).unwrap_or_default();
    json!({
        "set_map": result_text(set),
        "pairs_after": pairs,
    })
}

pub(super) fn local_response() -> Action {
    send(
        418,
        vec![
            ("x-a", "1"),
            ("x-a", "2"),
            ("X-Upper", "U"),
            ("x-empty", ""),
            ("content-type", "text/probe"),
        ],
        Some(b"teapot body"),
    )
}

pub(super) fn forward() -> Action {
    let _ = hc::set_map_value(
        MapType::HttpRequestHeaders,
        ":authority",
        Some("management.azure.com"),
    );
    Action::Continue
}

pub(super) fn shared() -> Value {
    let k = "probe.shared.k";
    let get = |key: &str| match hc::get_shared_data(key) {
        Ok((value, cas)) => {
            json!({"value": value.as_deref().map(text), "cas": cas.map(|c| c != 0)})
        }
        Err(status) => json!(format!("<{status:?}>")),
    };
    let set = |key: &str, value: Option<&[u8]>, cas: Option<u32>| {
        result_text(hc::set_shared_data(key, value, cas))
    };
    let cas_of = |key: &str| hc::get_shared_data(key).ok().and_then(|(_, cas)| cas);
    let mut out = serde_json::Map::new();
    out.insert("get_missing".into(), get(k));
    out.insert("set_new".into(), json!(set(k, Some(b"v1"), None)));
    out.insert("get_after_set".into(), get(k));
    let cas1 = cas_of(k);
    out.insert(
        "set_with_current_cas".into(),
        json!(set(k, Some(b"v2"), cas1)),
    );
    let cas2 = cas_of(k);
    out.insert("cas_changed_on_write".into(), json!(cas1 != cas2));
    out.insert(
        "set_with_stale_cas".into(),
        json!(set(k, Some(b"v3"), cas1)),
    );
    out.insert("value_after_stale".into(), get(k));
    out.insert(
        "set_missing_key_with_cas".into(),
        json!(set("probe.shared.fresh", Some(b"x"), Some(12_345))),
    );
    out.insert("set_unconditional".into(), json!(set(k, Some(b"v4"), None)));
    out.insert("remove".into(), json!(set(k, None, None)));
    out.insert("get_after_remove".into(), get(k));
    out.insert(
        "set_empty_value".into(),
        json!(set("probe.shared.empty", Some(b""), None)),
    );
    out.insert("get_empty_value".into(), get("probe.shared.empty"));
    out.insert("set_empty_key".into(), json!(set("", Some(b"e"), None)));
    out.insert("get_empty_key".into(), get(""));
    let big = vec![b'b'; 100_000];
    out.insert(
        "set_100k".into(),
        json!(set("probe.shared.big", Some(&big), None)),
    );
    out.insert(
        "get_100k_len".into(),
        json!(
            hc::get_shared_data("probe.shared.big")
                .ok()
                .and_then(|(v, _)| v)
                .map(|v| v.len())
        ),
    );
    Value::Object(out)
}

pub(super) fn metrics() -> Value {
    let (counter_status, counter) = raw::define_metric(0, "probe_counter");
    let (gauge_status, gauge) = raw::define_metric(1, "probe_gauge");
    let (hist_status, hist) = raw::define_metric(2, "probe_histogram");
    let (again_status, again) = raw::define_metric(0, "probe_counter");
    let (bad_kind_status, _) = raw::define_metric(7, "probe_bad_kind");
    let inc1 = raw::increment_metric(counter, 3);
    let inc2 = raw::increment_metric(counter, 3);
    let counter_value = raw::get_metric(counter);
    let counter_zero = raw::increment_metric(counter, 0);
    let counter_negative = raw::increment_metric(counter, -1);
    let counter_after_negative = raw::get_metric(counter);
    let counter_record = raw::record_metric(counter, 100);
    let counter_after_record = raw::get_metric(counter);
    let gauge_record = raw::record_metric(gauge, 42);
    let gauge_value = raw::get_metric(gauge);
    let gauge_dec = raw::increment_metric(gauge, -2);
    let gauge_after_dec = raw::get_metric(gauge);
    let hist_record = raw::record_metric(hist, 7);
    let hist_get = raw::get_metric(hist);
    let hist_inc = raw::increment_metric(hist, 1);
    json!({
        "define": [counter_status, gauge_status, hist_status],
        "ids_distinct": counter != gauge && gauge != hist && counter != hist,
        "redefine_status": again_status,
        "redefine_same_id": again == counter,
        "define_bad_kind": bad_kind_status,
        "counter_increment": [inc1, inc2],
        "counter_get": counter_value,
        "counter_increment_zero": counter_zero,
        "counter_increment_negative": counter_negative,
        "redefined_id_reads_same_value": raw::get_metric(again) == raw::get_metric(counter),
        "counter_after_negative": counter_after_negative,
        "counter_record": counter_record,
        "counter_after_record": counter_after_record,
        "gauge_record": gauge_record,
        "gauge_get": gauge_value,
        "gauge_increment_negative": gauge_dec,
        "gauge_after_negative": gauge_after_dec,
        "histogram_record": hist_record,
        "histogram_get": hist_get,
        "histogram_increment": hist_inc,
        "get_unknown_id": raw::get_metric(424_242),
        "record_unknown_id": raw::record_metric(424_242, 1),
        "increment_unknown_id": raw::increment_metric(424_242, 1),
    })
}

/// How a property's value is recorded: some values depend on ports, times or ids, so only
/// their shape is compared.
#[derive(Clone, Copy)]
pub(super) enum Shape {
    /// The UTF-8 text.
    Text,
    /// The text without a `:port` suffix.
    Host,
    /// An 8-byte little-endian integer, as its value.
    Int,
    /// An 8-byte integer: only whether it is non-zero.
    NonZeroInt,
    /// A 1-byte bool.
    Bool,
    /// Only the length class: empty or not.
    Present,
}

pub(super) fn properties() -> Value {
    use Shape::{Bool, Host, Int, NonZeroInt, Present, Text};
    let paths: &[(&[&str], Shape)] = &[
        (&["request", "path"], Text),
        (&["request", "url_path"], Text),
        (&["request", "host"], Host),
        (&["request", "scheme"], Text),
        (&["request", "method"], Text),
        (&["request", "protocol"], Text),
        (&["request", "query"], Text),
        (&["request", "headers", "x-rep"], Text),
        (&["request", "headers", "x-missing"], Text),
        (&["request", "id"], Present),
        (&["request", "time"], Present),
        (&["request", "useragent"], Text),
        (&["request", "referer"], Text),
        (&["source", "address"], Host),
        (&["source", "port"], NonZeroInt),
        (&["destination", "address"], Host),
        (&["destination", "port"], NonZeroInt),
        (&["connection", "mtls"], Bool),
        (&["connection", "tls_version"], Text),
        (&["connection", "requested_server_name"], Text),
        (&["connection", "subject_peer_certificate"], Text),
        (&["connection", "subject_local_certificate"], Text),
        (&["connection", "dns_san_peer_certificate"], Text),
        (&["connection", "uri_san_peer_certificate"], Text),
        (&["connection", "sha256_peer_certificate_digest"], Text),
        (&["connection", "id"], Present),
        (&["upstream", "address"], Present),
        (&["response", "code"], Int),
        (&["plugin_name"], Text),
        (&["plugin_root_id"], Text),
        (&["plugin_vm_id"], Text),
        (&["xds", "cluster_name"], Text),
        (&["xds", "route_name"], Text),
        (&["no_such", "property"], Text),
    ];
    let mut out = serde_json::Map::new();
    for (path, shape) in paths {
        let value = match hc::get_property(path.to_vec()) {
            Ok(None) => json!(null),
            Ok(Some(bytes)) => shaped(&bytes, *shape),
            Err(status) => json!(format!("<{status:?}>")),
        };
        out.insert(path.join("."), value);
    }
    let set = raw::set_property(&["probe_custom"], b"v1");
    out.insert("set:probe_custom".into(), json!(set));
    out.insert(
        "get:probe_custom".into(),
        match hc::get_property(vec!["probe_custom"]) {
            Ok(value) => json!(value.as_deref().map(text)),
            Err(status) => json!(format!("<{status:?}>")),
        },
    );
    Value::Object(out)
}

pub(super) fn shaped(bytes: &[u8], shape: Shape) -> Value {
    let int = || <[u8; 8]>::try_from(bytes).ok().map(i64::from_le_bytes);
    match shape {
        Shape::Text => json!(text(bytes)),
        Shape::Host => json!(strip_port(&text(bytes))),
        Shape::Int => int().map_or_else(|| json!(format!("{} bytes", bytes.len())), |v| json!(v)),
        Shape::NonZeroInt => int().map_or_else(
            || json!(format!("{} bytes", bytes.len())),
            |v| json!(v != 0),
        ),
        Shape::Bool => match bytes {
            [b] => json!(*b != 0),
            _ => json!(format!("{} bytes", bytes.len())),
        },
        Shape::Present => json!(if bytes.is_empty() { "empty" } else { "present" }),
    }
}
