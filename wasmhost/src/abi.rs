//! Proxy-Wasm ABI 0.2.x constants and the pair serialisation used for header maps, local
//! responses, call-outs and map-valued properties.

/// `proxy_status_t` values this host returns. Only codes the Rust SDK 0.2.x understands are
/// used (it has no 5, 6, 9, 11 or 12 and treats unknown codes as undefined behaviour).
pub(crate) mod status {
    /// Success.
    pub(crate) const OK: i32 = 0;
    /// The key, buffer or property does not exist.
    pub(crate) const NOT_FOUND: i32 = 1;
    /// A bad argument (unknown cluster, missing pseudo-header, unknown context, ...).
    pub(crate) const BAD_ARGUMENT: i32 = 2;
    /// Input could not be parsed (e.g. a malformed pair map).
    pub(crate) const PARSE_FAILURE: i32 = 4;
    /// Nothing to return (an empty queue).
    pub(crate) const EMPTY: i32 = 7;
    /// Compare-and-swap mismatch.
    pub(crate) const CAS_MISMATCH: i32 = 8;
}

/// `Action` returned by stream callbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Carry on.
    Continue,
    /// Stop until `proxy_continue_stream` (or a local response).
    Pause,
}

impl Action {
    /// Reads a callback's return value; anything but 1 continues, as in Envoy.
    pub fn from_raw(raw: i32) -> Self {
        if raw == 1 {
            Self::Pause
        } else {
            Self::Continue
        }
    }
}

/// Header map types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapType {
    /// Request headers of the stream.
    RequestHeaders,
    /// Request trailers of the stream.
    RequestTrailers,
    /// Response headers of the stream.
    ResponseHeaders,
    /// Response trailers of the stream.
    ResponseTrailers,
    /// gRPC initial metadata (unsupported).
    GrpcInitialMetadata,
    /// gRPC trailing metadata (unsupported).
    GrpcTrailingMetadata,
    /// Headers of the call-out response being delivered.
    HttpCallResponseHeaders,
    /// Trailers of the call-out response being delivered.
    HttpCallResponseTrailers,
}

impl MapType {
    /// Decodes the ABI value.
    pub(crate) fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffer types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BufferType {
    /// Request body of the stream.
    HttpRequestBody,
    /// Response body of the stream.
    HttpResponseBody,
    /// L4 downstream data (unsupported).
    DownstreamData,
    /// L4 upstream data (unsupported).
    UpstreamData,
    /// Body of the call-out response being delivered.
    HttpCallResponseBody,
    /// gRPC message (unsupported).
    GrpcReceiveBuffer,
    /// VM configuration, during `proxy_on_vm_start`.
    VmConfiguration,
    /// Plugin configuration, during `proxy_on_configure`.
    PluginConfiguration,
    /// Foreign function arguments (unsupported).
    CallData,
}

impl BufferType {
    /// Decodes the ABI value.
    pub(crate) fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::HttpRequestBody,
            1 => Self::HttpResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::HttpCallResponseBody,
            5 => Self::GrpcReceiveBuffer,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::CallData,
            _ => return None,
        })
    }
}

/// Log levels, TRACE=0 .. CRITICAL=5.
pub(crate) fn log_level_name(level: i32) -> &'static str {
    match level {
        0 => "trace",
        1 => "debug",
        2 => "info",
        3 => "warn",
        4 => "error",
        _ => "critical",
    }
}

/// Serialises pairs: `u32 n`, `n × (u32 key_len, u32 value_len)`, then each key and value
/// followed by a NUL. An empty list is empty bytes (the host then returns ptr=0, size=0).
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    if pairs.is_empty() {
        return Vec::new();
    }
    let mut size = 4;
    for (k, v) in pairs {
        size += 8 + k.as_ref().len() + v.as_ref().len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parses serialised pairs; `None` if the bytes are not a well-formed map. Empty input (and the
/// 1-byte form some SDKs write) is the empty map.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.len() <= 1 {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(raw) as usize)
    };
    let count = word(0)?;
    let mut lengths = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        lengths.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut pairs = Vec::with_capacity(lengths.len());
    for (klen, vlen) in lengths {
        let key = bytes.get(at..at.checked_add(klen)?)?.to_vec();
        at = at.checked_add(klen + 1)?;
        let value = bytes.get(at..at.checked_add(vlen)?)?.to_vec();
        at = at.checked_add(vlen + 1)?;
        pairs.push((key, value));
    }
    if at > bytes.len() {
        return None;
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_in_the_sdk_layout() {
        let pairs = vec![(":method", "GET"), (":path", "/bytes/1")];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(&bytes[..4], &[2, 0, 0, 0]);
        assert_eq!(&bytes[4..12], &[7, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&bytes[20..28], b":method\0");
        let back = deserialize_pairs(&bytes).unwrap();
        assert_eq!(back[1], (b":path".to_vec(), b"/bytes/1".to_vec()));
    }

    #[test]
    fn empty_maps_are_empty_bytes_and_parse_back() {
        let none: Vec<(&str, &str)> = vec![];
        assert!(serialize_pairs(&none).is_empty());
        assert_eq!(deserialize_pairs(&[]).unwrap(), vec![]);
        assert_eq!(deserialize_pairs(&[0]).unwrap(), vec![]);
        assert_eq!(deserialize_pairs(&[0, 0, 0, 0]).unwrap(), vec![]);
    }

    #[test]
    fn truncated_or_lying_maps_are_refused() {
        let bytes = serialize_pairs(&[("a", "b")]);
        assert!(deserialize_pairs(&bytes[..bytes.len() - 1]).is_none());
        assert!(deserialize_pairs(&[0xff, 0xff, 0xff, 0xff, 1]).is_none());
        assert!(deserialize_pairs(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).is_none());
    }
}
