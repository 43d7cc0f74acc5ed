//! Properties (`proxy_get_property`), with Envoy's names and encodings: strings raw, integers
//! 8-byte little-endian, booleans one byte, timestamps int64 nanoseconds, maps in pair format.

use std::time::UNIX_EPOCH;

use crate::abi;
use crate::state::{HostState, Stream};

/// The value at `path`, or `None` (NOT_FOUND).
pub(crate) fn lookup(state: &HostState, path: &[String]) -> Option<Vec<u8>> {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let plugin = &state.plugin;
    match parts.as_slice() {
        ["plugin_name"] => return Some(plugin.name.clone().into_bytes()),
        ["plugin_root_id"] => return Some(plugin.root_id.clone().into_bytes()),
        ["plugin_vm_id"] => return Some(plugin.vm_id.clone().into_bytes()),
        _ => {}
    }
    let stream = state.effective_stream()?;
    // What the filter set itself comes first (Envoy reads its filter state by the first path
    // segment before the built-in attributes).
    if let [name] = parts.as_slice()
        && let Some(value) = stream.properties.get(name.as_bytes())
    {
        return Some(value.clone());
    }
    // Envoy reads these request properties from the request header map, so they exist only
    // while the filter is offered that map (or in the access log).
    let headers_open = stream.request_headers_open || state.access_log;
    let header = |name: &str| -> Option<Vec<u8>> {
        if !headers_open {
            return None;
        }
        stream
            .request_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    // Envoy joins repeated headers with a comma.
    let joined = |name: &str| -> Option<Vec<u8>> {
        if !headers_open {
            return None;
        }
        let values: Vec<&[u8]> = stream
            .request_headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
            .collect();
        (!values.is_empty()).then(|| values.join(&b","[..]))
    };
    match parts.as_slice() {
        ["source", "address"] => stream.info.source.map(|a| a.to_string().into_bytes()),
        ["source", "port"] => stream.info.source.map(|a| int(i64::from(a.port()))),
        ["destination", "address"] => stream.info.destination.map(|a| a.to_string().into_bytes()),
        ["destination", "port"] => stream.info.destination.map(|a| int(i64::from(a.port()))),
        ["connection", "mtls"] => Some(vec![u8::from(stream.info.mtls)]),
        ["connection", "subject_peer_certificate"] => {
            stream.info.peer_subject.clone().map(String::into_bytes)
        }
        ["connection", "subject_local_certificate"] => {
            stream.info.local_subject.clone().map(String::into_bytes)
        }
        ["connection", "sha256_peer_certificate_digest"] => stream
            .info
            .peer_certificate_sha256
            .clone()
            .map(String::into_bytes),
        ["connection", "tls_version"] => stream.info.tls_version.clone().map(String::into_bytes),
        ["connection", "id"] => stream.info.connection_id.map(|id| int(id as i64)),
        ["request", "path"] => header(":path"),
        ["request", "url_path"] => header(":path").map(|p| {
            let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
            p[..end].to_vec()
        }),
        ["request", "query"] => header(":path").map(|p| match p.iter().position(|b| *b == b'?') {
            Some(i) => p[i + 1..].to_vec(),
            None => Vec::new(),
        }),
        ["request", "host"] => header(":authority"),
        ["request", "scheme"] => header(":scheme"),
        ["request", "method"] => header(":method"),
        ["request", "id"] => headers_open.then(|| stream.info.request_id.clone().into_bytes()),
        ["request", "protocol"] => Some(stream.info.protocol.clone().into_bytes()),
        ["request", "headers"] => headers_open.then(|| abi::serialize_pairs(&regular(stream))),
        ["request", "headers", name] => joined(&name.to_ascii_lowercase()),
        ["request", "time"] => stream
            .info
            .started
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| int(d.as_nanos() as i64)),
        ["response", "code"] => stream
            .response_headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            .map(int),
        _ => None,
    }
}

fn regular(stream: &Stream) -> Vec<(String, Vec<u8>)> {
    stream
        .request_headers
        .iter()
        .filter(|(k, _)| !k.starts_with(':'))
        .cloned()
        .collect()
}

fn int(value: i64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}
