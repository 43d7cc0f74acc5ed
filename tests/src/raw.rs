//! A raw-bytes client for hostile requests: TLS (tokio-rustls, any client certificate and key,
//! including keys ring will not load such as RSA-1024), then HTTP/1.1 bytes written verbatim or
//! HTTP/2 frames built by hand (HPACK literals, so header names and values carry any byte), and
//! an answer read back as a status, headers and body — or as what happened instead (the
//! connection closed, the stream reset, TLS refused, no answer in time).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Turns `\xNN` escapes into bytes and `\\` into one backslash; everything else is kept as its
/// UTF-8 bytes. Case files write header bytes this way (JSON strings cannot hold raw bytes).
pub fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
                continue;
            }
            if bytes.get(i + 1) == Some(&b'x')
                && let Some(hex) = text.get(i + 2..i + 4)
                && let Ok(byte) = u8::from_str_radix(hex, 16)
            {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// A client private key.
#[derive(Clone)]
pub enum ClientKey {
    /// PKCS#8 that ring loads (ECDSA P-256/P-384, Ed25519).
    Pkcs8(Vec<u8>),
    /// RSA of any size, signed with the `rsa` crate (ring refuses keys under 2048 bits).
    Rsa(Arc<rsa::RsaPrivateKey>),
}

/// A client certificate chain and its key.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's key.
    pub key: ClientKey,
}

#[derive(Debug)]
struct FixedIdentity(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// RSA signing for TLS with the `rsa` crate: PSS (TLS 1.3) or PKCS#1 v1.5 (TLS 1.2).
struct RsaKey(Arc<rsa::RsaPrivateKey>);

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RsaKey(..)")
    }
}

impl SigningKey for RsaKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        [
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
        .into_iter()
        .find(|s| offered.contains(s))
        .map(|scheme| {
            Box::new(RsaSigner {
                key: self.0.clone(),
                scheme,
            }) as Box<dyn Signer>
        })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::RSA
    }
}

struct RsaSigner {
    key: Arc<rsa::RsaPrivateKey>,
    scheme: SignatureScheme,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaSigner({:?})", self.scheme)
    }
}

impl Signer for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        use sha2::{Digest, Sha256};
        let failed = |e: rsa::Error| rustls::Error::General(format!("RSA signing: {e}"));
        match self.scheme {
            SignatureScheme::RSA_PSS_SHA256 => {
                let key = rsa::pss::BlindedSigningKey::<Sha256>::new((*self.key).clone());
                let signature = key
                    .try_sign_with_rng(&mut rand_core::OsRng, message)
                    .map_err(|e| rustls::Error::General(format!("RSA-PSS signing: {e}")))?;
                Ok(signature.to_vec())
            }
            _ => self
                .key
                .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))
                .map_err(failed),
        }
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A TLS client configuration trusting `ca_pem`, presenting `identity` (if any), offering
/// `alpn`.
pub fn tls_config(
    ca_pem: &str,
    identity: Option<&ClientIdentity>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA certificate")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain: Vec<CertificateDer<'static>> = identity
                .chain
                .iter()
                .map(|der| CertificateDer::from(der.clone()))
                .collect();
            let key: Arc<dyn SigningKey> = match &identity.key {
                ClientKey::Pkcs8(der) => rustls::crypto::ring::sign::any_supported_type(
                    &PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.clone())),
                )
                .map_err(|e| anyhow!("client key: {e}"))?,
                ClientKey::Rsa(key) => Arc::new(RsaKey(key.clone())),
            };
            builder.with_client_cert_resolver(Arc::new(FixedIdentity(Arc::new(CertifiedKey::new(
                chain, key,
            )))))
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What came back for a request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// An HTTP answer.
    Response(Response),
    /// No answer: the connection closed or the stream was reset (the reason says which).
    Closed(String),
    /// The TLS handshake failed, or the server's first bytes were a TLS alert.
    TlsRefused(String),
    /// Nothing within the deadline.
    TimedOut,
}

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
    /// The server will take another request on this connection.
    pub keep_alive: bool,
}

impl Response {
    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Sorts an I/O error: a TLS alert from the server means it refused us at TLS.
fn io_answer(error: &std::io::Error) -> Answer {
    if let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return Answer::TlsRefused(tls.to_string());
    }
    Answer::Closed(format!("{}: {error}", kind_name(error.kind())))
}

fn kind_name(kind: std::io::ErrorKind) -> &'static str {
    match kind {
        std::io::ErrorKind::UnexpectedEof => "eof",
        std::io::ErrorKind::ConnectionReset => "reset",
        std::io::ErrorKind::BrokenPipe => "broken pipe",
        _ => "error",
    }
}

/// Opens TCP and TLS to `addr` (server name `localhost`). `Err(answer)` when TLS fails.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<std::result::Result<TlsStream<TcpStream>, Answer>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    match TlsConnector::from(config).connect(name, tcp).await {
        Ok(stream) => Ok(Ok(stream)),
        Err(error) => Ok(Err(match io_answer(&error) {
            Answer::Closed(why) => Answer::TlsRefused(why),
            other => other,
        })),
    }
}

/// One HTTP/1.1 connection: bytes out verbatim, answers parsed back.
pub struct H1Conn {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    eof: bool,
}

impl H1Conn {
    /// Wraps an open TLS stream.
    pub fn new(io: TlsStream<TcpStream>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes `bytes` as they are. `Err(answer)` if the connection is gone.
    pub async fn send(&mut self, bytes: &[u8]) -> std::result::Result<(), Answer> {
        self.io.write_all(bytes).await.map_err(|e| io_answer(&e))?;
        self.io.flush().await.map_err(|e| io_answer(&e))
    }

    /// Half-closes the write side (the request ends here, whatever it promised).
    pub async fn shutdown_write(&mut self) {
        let _ = self.io.shutdown().await;
    }

    async fn fill(&mut self) -> std::result::Result<usize, Answer> {
        let mut chunk = [0u8; 16 * 1024];
        match self.io.read(&mut chunk).await {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            // A peer that resets after answering: keep what was read.
            Err(e) if !self.buf.is_empty() => {
                self.eof = true;
                let _ = e;
                Ok(0)
            }
            Err(e) => Err(io_answer(&e)),
        }
    }

    /// Reads the next answer (skipping 1xx). `head`: the request was HEAD (no body follows).
    pub async fn read_response(&mut self, head: bool) -> Answer {
        loop {
            match self.read_one(head).await {
                Ok(Some(response)) if (100..200).contains(&response.status) => continue,
                Ok(Some(response)) => return Answer::Response(response),
                Ok(None) => return Answer::Closed("eof before an answer".into()),
                Err(answer) => return answer,
            }
        }
    }

    /// Whether more bytes (another answer) arrive within `wait`.
    pub async fn more_within(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        if self.eof {
            return false;
        }
        matches!(
            tokio::time::timeout(wait, self.fill()).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// Whether the server has closed the connection (checked without waiting long).
    pub async fn closed(&mut self) -> bool {
        if self.eof {
            return true;
        }
        matches!(
            tokio::time::timeout(Duration::from_millis(20), self.fill()).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn read_one(&mut self, head: bool) -> std::result::Result<Option<Response>, Answer> {
        let (status, headers, consumed) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, Vec<u8>)> = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect();
                    break (parsed.code.unwrap_or(0), headers, n);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    return Err(Answer::Closed(format!(
                        "unparseable answer ({e}): {:?}",
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                    )));
                }
            }
            if self.eof || self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Answer::Closed(format!(
                        "eof inside an answer: {:?}",
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                    )))
                };
            }
        };
        self.buf.drain(..consumed);
        let value = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
        };
        let mut keep_alive = value("connection").is_none_or(|c| !c.contains("close"));
        let body = if head || status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if value("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            self.read_chunked().await?
        } else if let Some(length) = value("content-length") {
            let length: usize = length
                .trim()
                .parse()
                .map_err(|_| Answer::Closed(format!("bad content-length {length:?}")))?;
            while self.buf.len() < length {
                if self.fill().await? == 0 {
                    return Err(Answer::Closed("eof inside a body".into()));
                }
            }
            self.buf.drain(..length).collect()
        } else {
            keep_alive = false;
            while self.fill().await? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Some(Response {
            status,
            headers,
            body,
            keep_alive: keep_alive && !self.eof,
        }))
    }

    async fn read_chunked(&mut self) -> std::result::Result<Vec<u8>, Answer> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_text = line
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            let size = usize::from_str_radix(&size_text, 16)
                .map_err(|_| Answer::Closed(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err(Answer::Closed("eof inside a chunk".into()));
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    async fn read_line(&mut self) -> std::result::Result<String, Answer> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(Answer::Closed("eof inside chunked framing".into()));
            }
        }
    }
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FRAME_GOAWAY: u8 = 7;
const FRAME_CONTINUATION: u8 = 9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which every server accepts.
const MAX_FRAME: usize = 16_384;

/// An HTTP/2 request as frames: header fields (pseudo-headers included, in the order given)
/// encoded as HPACK literals without Huffman or indexing, so any byte goes through.
#[derive(Clone, Debug, Default)]
pub struct H2Request {
    /// Every header field, in order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Body sent in DATA frames; `None`: END_STREAM on the HEADERS frame.
    pub body: Option<Vec<u8>>,
    /// Leave the stream open after the body (an incomplete request).
    pub leave_open: bool,
}

/// One HTTP/2 connection.
pub struct H2Conn {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    decoder: fluke_hpack::Decoder<'static>,
    next_stream: u32,
    /// Set once the server sent GOAWAY: (last stream id, error code).
    goaway: Option<(u32, u32)>,
    eof: bool,
}

/// HPACK integer with an `prefix`-bit prefix, first byte OR-ed with `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

impl H2Conn {
    /// Sends the connection preface and our SETTINGS (no server push).
    pub async fn handshake(io: TlsStream<TcpStream>) -> std::result::Result<Self, Answer> {
        let mut conn = Self {
            io,
            buf: Vec::new(),
            decoder: fluke_hpack::Decoder::new(),
            next_stream: 1,
            goaway: None,
            eof: false,
        };
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend(frame(FRAME_SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]));
        conn.write(&preface).await?;
        Ok(conn)
    }

    async fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), Answer> {
        self.io.write_all(bytes).await.map_err(|e| io_answer(&e))?;
        self.io.flush().await.map_err(|e| io_answer(&e))
    }

    /// Sends `request` on a new stream and returns its id.
    pub async fn send(&mut self, request: &H2Request) -> std::result::Result<u32, Answer> {
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        for (name, value) in &request.fields {
            hpack_literal(&mut block, name, value);
        }
        let end_stream = request.body.is_none() && !request.leave_open;
        let mut out = Vec::new();
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let first = chunks.next().unwrap_or_default();
        let mut flags = if end_stream { FLAG_END_STREAM } else { 0 };
        if chunks.peek().is_none() {
            flags |= FLAG_END_HEADERS;
        }
        out.extend(frame(FRAME_HEADERS, flags, stream, first));
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            out.extend(frame(FRAME_CONTINUATION, flags, stream, chunk));
        }
        if let Some(body) = &request.body {
            let pieces: Vec<&[u8]> = if body.is_empty() {
                vec![&[]]
            } else {
                body.chunks(MAX_FRAME).collect()
            };
            let last = pieces.len() - 1;
            for (i, piece) in pieces.into_iter().enumerate() {
                let flags = if i == last && !request.leave_open {
                    FLAG_END_STREAM
                } else {
                    0
                };
                out.extend(frame(FRAME_DATA, flags, stream, piece));
            }
        }
        self.write(&out).await?;
        Ok(stream)
    }

    async fn next_frame(&mut self) -> std::result::Result<Option<(u8, u8, u32, Vec<u8>)>, Answer> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let kind = self.buf[3];
                    let flags = self.buf[4];
                    let stream =
                        u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Ok(Some((kind, flags, stream, payload)));
                }
            }
            if self.eof {
                return Ok(None);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.io.read(&mut chunk).await {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if self.buf.is_empty() => return Err(io_answer(&e)),
                Err(_) => self.eof = true,
            }
        }
    }

    /// Reads frames until `stream` is answered (or reset, or the connection ends).
    pub async fn read_response(&mut self, stream: u32) -> Answer {
        let mut status = None;
        let mut headers = Vec::new();
        let mut body = Vec::new();
        let mut block: Option<(u32, u8, Vec<u8>)> = None;
        loop {
            let (kind, flags, id, payload) = match self.next_frame().await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    return Answer::Closed(match self.goaway {
                        Some((last, code)) => format!("goaway (last stream {last}, code {code})"),
                        None => "eof before an answer".into(),
                    });
                }
                Err(answer) => return answer,
            };
            match kind {
                FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                    if let Err(answer) = self.write(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])).await
                    {
                        return answer;
                    }
                }
                FRAME_PING if flags & FLAG_ACK == 0 => {
                    if let Err(answer) = self.write(&frame(FRAME_PING, FLAG_ACK, 0, &payload)).await
                    {
                        return answer;
                    }
                }
                FRAME_GOAWAY if payload.len() >= 8 => {
                    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff;
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    self.goaway = Some((last, code));
                    if last < stream {
                        return Answer::Closed(format!("goaway (last stream {last}, code {code})"));
                    }
                }
                FRAME_RST_STREAM if id == stream => {
                    let code = payload
                        .get(..4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or_default();
                    return Answer::Closed(format!("stream reset (code {code})"));
                }
                FRAME_HEADERS | FRAME_CONTINUATION => {
                    let fragment = if kind == FRAME_HEADERS {
                        match headers_fragment(flags, &payload) {
                            Some(fragment) => fragment,
                            None => return Answer::Closed("malformed HEADERS frame".into()),
                        }
                    } else {
                        payload
                    };
                    let (owner, first_flags, mut collected) = match block.take() {
                        Some(open) if kind == FRAME_CONTINUATION => open,
                        _ => (id, flags, Vec::new()),
                    };
                    collected.extend(fragment);
                    if flags & FLAG_END_HEADERS == 0 {
                        block = Some((owner, first_flags, collected));
                        continue;
                    }
                    // Every header block is decoded, ours or not, to keep the HPACK table right.
                    let Ok(fields) = self.decoder.decode(&collected) else {
                        return Answer::Closed("undecodable HPACK from the server".into());
                    };
                    if owner != stream {
                        continue;
                    }
                    if status.is_none() {
                        let code = fields
                            .iter()
                            .find(|(k, _)| k == b":status")
                            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
                        match code {
                            Some(code) if (100..200).contains(&code) => continue,
                            Some(code) => {
                                status = Some(code);
                                headers = fields
                                    .into_iter()
                                    .filter(|(k, _)| !k.starts_with(b":"))
                                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                                    .collect();
                            }
                            None => return Answer::Closed("answer without :status".into()),
                        }
                    }
                    if first_flags & FLAG_END_STREAM != 0 {
                        break;
                    }
                }
                FRAME_DATA if id == stream => {
                    let data = if flags & FLAG_PADDED != 0 {
                        let pad = usize::from(payload.first().copied().unwrap_or_default());
                        payload
                            .get(1..payload.len().saturating_sub(pad))
                            .unwrap_or_default()
                            .to_vec()
                    } else {
                        payload
                    };
                    body.extend(data);
                    if flags & FLAG_END_STREAM != 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        match status {
            Some(status) => Answer::Response(Response {
                status,
                headers,
                body,
                keep_alive: self.goaway.is_none() && !self.eof,
            }),
            None => Answer::Closed("stream ended without an answer".into()),
        }
    }

    /// Whether the connection can take another stream.
    pub fn usable(&self) -> bool {
        self.goaway.is_none() && !self.eof
    }
}

/// The header block fragment of a HEADERS frame (padding and priority removed).
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        start += 1;
        end = end.checked_sub(pad)?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end).map(<[u8]>::to_vec)
}

/// Sends one request and reads its answer within `deadline`.
pub async fn with_deadline<F: std::future::Future<Output = Answer>>(
    deadline: Duration,
    work: F,
) -> Answer {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Answer::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_turns_hex_escapes_into_bytes() {
        assert_eq!(unescape(r"a\xffb\\x"), b"a\xffb\\x");
        assert_eq!(unescape(r"\x0"), b"\\x0");
        assert_eq!(unescape("ü"), "ü".as_bytes());
    }

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
    }
}
