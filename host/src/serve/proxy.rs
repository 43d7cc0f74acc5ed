//! One request: its headers into the VM (the filter decides and calls out), then forwarding to
//! Azure, or the VM's or the gateway's own answer.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};

use azgate_wasmhost::{HeaderList, HostError, LocalResponse, StreamInfo};

use super::error::ServeError;
use super::upstream::{AzureClient, BoxError};
use super::worker::{Outcome, Pending, Worker};
use crate::config::{MAX_REQUEST_HEADERS_BYTES, too_many_header_fields};
use crate::hop_by_hop;

/// Body of every response the gateway sends.
pub(crate) type ResponseBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Per-worker forwarding settings.
pub(crate) struct Forwarding {
    pub(crate) client: AzureClient,
    pub(crate) request_timeout: Duration,
    pub(crate) max_request_body_bytes: usize,
}

use super::connection::Connection;

/// Ends the stream in the VM however the request ends (answered, or dropped by the client).
struct StreamGuard {
    worker: Rc<Worker>,
    id: u32,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.worker.finish_stream(self.id);
    }
}

struct InFlight(Rc<Worker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight(false);
    }
}

pub(crate) async fn handle(
    worker: Rc<Worker>,
    forwarding: Rc<Forwarding>,
    connection: Rc<Connection>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    worker.stats.in_flight(true);
    let _in_flight = InFlight(worker.clone());
    let deadline = tokio::time::Instant::now() + connection.timeouts.request;
    let guard = match &connection.verdicts {
        Some(verdicts) if request.version() != http::Version::HTTP_2 => verdicts.next(),
        _ => Ok(()),
    };
    if let Err(error) = guard.and_then(|()| refuse_early(&request)) {
        return answer_error(&worker, &error);
    }
    let headers = request_headers(&request, &connection);
    let info = StreamInfo {
        source: Some(connection.peer),
        destination: Some(connection.local),
        mtls: connection.certificate.is_some(),
        peer_subject: connection.certificate.as_ref().map(|c| c.subject.clone()),
        protocol: match request.version() {
            http::Version::HTTP_2 => "HTTP/2".into(),
            http::Version::HTTP_10 => "HTTP/1.0".into(),
            _ => "HTTP/1.1".into(),
        },
        request_id: request_id(),
        started: Some(SystemTime::now()),
        connection_id: Some(connection.id),
        tls_version: connection.tls_version.clone(),
        peer_certificate_sha256: connection.certificate.as_ref().map(|c| c.sha256.clone()),
        local_subject: connection.local_subject.clone(),
    };
    let end_of_stream = request.body().is_end_stream();
    let (id, pending) = match worker.start_stream(headers, info, end_of_stream) {
        Ok(started) => started,
        Err(error) => return answer_error(&worker, &ServeError::Filter(error)),
    };
    let _stream = StreamGuard {
        worker: worker.clone(),
        id,
    };
    let outcome = match pending {
        Pending::Ready(outcome) => outcome,
        Pending::Wait(rx) => rx.await.unwrap_or_else(|_| {
            Outcome::Failed(HostError::Failed("the request was abandoned".into()))
        }),
    };
    match outcome {
        Outcome::Continue => match forward(&worker, &forwarding, id, request, deadline).await {
            Ok(response) => {
                worker.stats.request("allow", "Allowed");
                response
            }
            Err(error) => {
                if error.is_upstream() {
                    worker.stats.upstream_error();
                }
                // Like the router's local replies in Envoy, this passes through the filter's
                // response callback.
                tracing::warn!(code = error.code(), %error, "request failed in the gateway");
                worker.stats.request("error", error.code());
                local_response(through_response_headers(
                    &worker,
                    id,
                    error_response(&error),
                ))
            }
        },
        Outcome::Respond(local) => {
            let code = local
                .headers
                .iter()
                .find(|(k, _)| k == "x-azgate-error")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| "LocalResponse".into());
            worker.stats.request("deny", &code);
            local_response(through_response_headers(&worker, id, local))
        }
        Outcome::Close => answer_error(&worker, &ServeError::StreamClosed),
        Outcome::Failed(error) => answer_error(&worker, &ServeError::Filter(error)),
    }
}

/// Refuses, before the filter runs, what must never reach the filter or Azure whatever the
/// filter would decide: a tunnel (`CONNECT`) or an echo (`TRACE`, which would return the
/// injected token), a target that is not a path (`*`, absolute-form `https://host/…`), and an
/// HTTP/2 header block over Envoy's limits.
fn refuse_early(request: &Request<Incoming>) -> Result<(), ServeError> {
    let method = request.method();
    if method == http::Method::CONNECT || method == http::Method::TRACE {
        return Err(ServeError::MethodNotAllowed(method.to_string()));
    }
    let uri = request.uri();
    // HTTP/2 carries the scheme and authority beside `:path`; in HTTP/1.x a URI with either is
    // absolute-form (or CONNECT's authority-form).
    let origin_form = request.version() == http::Version::HTTP_2
        || (uri.scheme().is_none() && uri.authority().is_none());
    if !origin_form || !uri.path().starts_with('/') {
        return Err(ServeError::InvalidRequestTarget);
    }
    // An HTTP/1.1 head was checked by the guard (hyper's parser takes only tokens as names, and
    // the guard applies the limits); HTTP/2 headers are checked here.
    if request.version() != http::Version::HTTP_2 {
        return Ok(());
    }
    let headers = request.headers();
    // HTTP/2's decoder takes names that are not tokens (RFC 9113 §8.2.1 calls such a request
    // malformed), and `http` would refuse them when `forward` builds the upstream request: the
    // same check, before the filter.
    if let Some(name) = headers
        .keys()
        .find(|name| http::HeaderName::from_bytes(name.as_str().as_bytes()).is_err())
    {
        return Err(ServeError::BadRequest(format!(
            "header name {:?} is not a token",
            name.as_str()
        )));
    }
    // A Host field is counted as `:authority`, among the pseudo-headers.
    let host = usize::from(headers.contains_key(http::header::HOST));
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    // Envoy refuses the 100th field (pseudo-headers included) and a block over 60 KiB.
    if too_many_header_fields(headers.len() - host) || bytes > MAX_REQUEST_HEADERS_BYTES as usize {
        return Err(ServeError::RequestHeaderFieldsTooLarge);
    }
    Ok(())
}

/// The request as the filter sees it: pseudo-headers first, names lower-cased, a client XFCC
/// dropped and the verified certificate's set (Envoy's `SANITIZE_SET`) on TLS listeners.
fn request_headers(request: &Request<Incoming>, connection: &Connection) -> HeaderList {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes().to_vec())
        .or_else(|| request.headers().get("host").map(|h| h.as_bytes().to_vec()))
        .unwrap_or_default();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers: HeaderList = vec![
        (":authority".into(), authority),
        (":path".into(), path.as_bytes().to_vec()),
        (
            ":method".into(),
            request.method().as_str().as_bytes().to_vec(),
        ),
        (
            ":scheme".into(),
            if connection.tls {
                b"https".to_vec()
            } else {
                b"http".to_vec()
            },
        ),
    ];
    for (name, value) in request.headers() {
        let name = name.as_str();
        if name == "host" || name == "x-forwarded-proto" {
            continue;
        }
        // Behind a trusted front the client XFCC is the front's; otherwise it is a forgery.
        if name == "x-forwarded-client-cert" && connection.tls {
            continue;
        }
        headers.push((name.to_string(), value.as_bytes().to_vec()));
    }
    headers.push((
        "x-forwarded-proto".into(),
        if connection.tls {
            b"https".to_vec()
        } else {
            b"http".to_vec()
        },
    ));
    if let Some(certificate) = &connection.certificate {
        headers.push((
            "x-forwarded-client-cert".into(),
            certificate.xfcc.as_bytes().to_vec(),
        ));
    }
    headers
}

async fn forward(
    worker: &Rc<Worker>,
    forwarding: &Forwarding,
    id: u32,
    request: Request<Incoming>,
    deadline: tokio::time::Instant,
) -> Result<Response<ResponseBody>, ServeError> {
    let headers = worker
        .request_headers(id)
        .ok_or_else(|| ServeError::InvalidUpstreamRequest("the stream is gone".into()))?;
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let authority = value(":authority")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ServeError::InvalidUpstreamRequest("no :authority".into()))?;
    // Userinfo or a path in `:authority` would move the request to another host.
    if authority.contains(['@', '/', '?', '#']) {
        return Err(ServeError::InvalidUpstreamRequest(
            ":authority is not a host".into(),
        ));
    }
    let path = value(":path").unwrap_or_else(|| "/".into());
    let method = value(":method").unwrap_or_else(|| "GET".into());
    // Checked again as the filter left them: whatever it decided, no tunnel, no echo, and a
    // path that cannot be read as part of the authority.
    if method.eq_ignore_ascii_case("CONNECT") || method.eq_ignore_ascii_case("TRACE") {
        return Err(ServeError::MethodNotAllowed(method));
    }
    if !path.starts_with('/') {
        return Err(ServeError::InvalidRequestTarget);
    }
    let mut builder = Request::builder()
        .method(method.as_str())
        .uri(format!("https://{authority}{path}"));
    for (name, value) in headers
        .iter()
        // `host` too: the target is the `:authority` the filter set.
        .filter(|(k, _)| !k.starts_with(':') && k != "host" && !hop_by_hop::is_hop_by_hop(k))
    {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let body = receive_body(
        request.into_body(),
        forwarding.max_request_body_bytes,
        deadline,
    )
    .await?;
    let upstream = builder
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .map_err(|e| ServeError::InvalidUpstreamRequest(e.to_string()))?;
    let response = match tokio::time::timeout(
        forwarding.request_timeout,
        forwarding.client.request(upstream),
    )
    .await
    {
        Err(_) => return Err(ServeError::UpstreamTimeout),
        Ok(Err(error)) => return Err(ServeError::UpstreamUnavailable(error.to_string())),
        Ok(Ok(response)) => response,
    };
    let (mut parts, body) = response.into_parts();
    let mut response_headers: HeaderList =
        vec![(":status".into(), parts.status.as_str().as_bytes().to_vec())];
    response_headers.extend(
        parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())),
    );
    if let Some(local) = worker.response_headers(id, response_headers, body.is_end_stream()) {
        return Ok(local_response(local));
    }
    // What the filter changed in the response headers goes to the client, as in Envoy.
    if let Some(filtered) = worker.response_headers_now(id) {
        let mut headers = http::HeaderMap::new();
        for (name, value) in &filtered {
            if name == ":status" {
                if let Some(status) = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|s| http::StatusCode::from_u16(s).ok())
                {
                    parts.status = status;
                }
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        parts.headers = headers;
    }
    hop_by_hop::strip(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// The whole request body, before anything goes upstream: a body that is malformed, ends
/// early, grows over `limit` or is still arriving at `deadline` is refused and Azure sees
/// nothing of the request.
async fn receive_body(
    body: Incoming,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ServeError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ServeError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            Err(ServeError::RequestTooLarge)
        }
        Ok(Err(error)) => Err(ServeError::BadRequest(format!("body: {error}"))),
    }
}

/// Runs the filter's `proxy_on_response_headers` on its own local response, as Envoy passes a
/// local reply through the encoder filters, and returns the response as the filter left it.
fn through_response_headers(worker: &Rc<Worker>, id: u32, local: LocalResponse) -> LocalResponse {
    let mut headers: HeaderList = vec![(":status".into(), local.status.to_string().into_bytes())];
    headers.extend(local.headers.iter().cloned());
    // A second local response made there is ignored, as Envoy ignores one during a reply.
    let _ = worker.response_headers(id, headers, local.body.is_empty());
    let Some(filtered) = worker.response_headers_now(id) else {
        return local;
    };
    let status = filtered
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
        .unwrap_or(local.status);
    LocalResponse {
        status,
        headers: filtered
            .into_iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .collect(),
        ..local
    }
}

fn local_response(local: LocalResponse) -> Response<ResponseBody> {
    let mut builder = Response::builder().status(local.status);
    for (name, value) in &local.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    builder
        .body(full(local.body))
        .unwrap_or_else(|_| plain_error(500))
}

/// A gateway error as an Azure-style JSON answer (logged without request data).
fn answer_error(worker: &Rc<Worker>, error: &ServeError) -> Response<ResponseBody> {
    tracing::warn!(code = error.code(), %error, "request failed in the gateway");
    worker.stats.request("error", error.code());
    local_response(error_response(error))
}

/// The Azure-style JSON answer for a gateway error.
fn error_response(error: &ServeError) -> LocalResponse {
    LocalResponse {
        status: error.status(),
        details: error.code().into(),
        headers: vec![
            (
                "content-type".into(),
                b"application/json; charset=utf-8".to_vec(),
            ),
            ("x-azgate-error".into(), error.code().as_bytes().to_vec()),
        ],
        body: error.body().into_bytes(),
    }
}

fn plain_error(status: u16) -> Response<ResponseBody> {
    let mut response = Response::new(full(Vec::new()));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response
}

fn full(bytes: Vec<u8>) -> ResponseBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// A unique request id for logs and the `request.id` property (not a secret, so a fast
/// non-cryptographic generator is enough; no system call per request).
fn request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
