//! A guard between an HTTP/1.1 connection and hyper. It follows the request framing as hyper
//! does (heads, `Content-Length` and chunked bodies) and holds each request head until it is
//! complete, so it can refuse, with an Azure-style answer and before hyper or the filter sees
//! it, what hyper accepts or answers bare:
//!
//! - both `Content-Length` and `Transfer-Encoding` (hyper drops the length and reads chunks;
//!   Envoy refuses), a transfer coding other than chunked, differing or unreadable lengths:
//!   400 `BadRequest`;
//! - a head over [`MAX_REQUEST_HEADERS_BYTES`] or with too many fields (hyper's bare 431):
//!   431 `RequestHeaderFieldsTooLarge`;
//! - a head still arriving `request_headers_timeout` after its first byte (hyper closes
//!   without an answer): 408 `RequestTimeout`, as Envoy answers.
//!
//! A refused head never reaches hyper: hyper is handed a stand-in request
//! ([`STAND_IN`], `connection: close`) instead, and nothing after it; the handler takes
//! the refusal from [`Verdicts`] (one per head, in order) and answers it. Nothing after a
//! refused head is read. A connection that opens with the HTTP/2 preface is passed through.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::ServeError;
use crate::config::{MAX_REQUEST_HEADERS_BYTES, too_many_header_fields};

/// What hyper parses in place of a refused head; the handler answers it from [`Verdicts`].
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: azgate.invalid\r\nconnection: close\r\n\r\n";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The guard's decision for each request head it let through, in order: `None` to serve it,
/// or the refusal to answer instead.
#[derive(Debug, Default)]
pub(crate) struct Verdicts(RefCell<VecDeque<Option<ServeError>>>);

impl Verdicts {
    /// The decision for the next request hyper dispatched. A request the guard did not see as
    /// a head (the two disagree on framing) is refused.
    pub(crate) fn next(&self) -> Result<(), ServeError> {
        match self.0.borrow_mut().pop_front() {
            Some(None) => Ok(()),
            Some(Some(refusal)) => Err(refusal),
            None => Err(ServeError::BadRequest("unexpected request framing".into())),
        }
    }

    fn push(&self, verdict: Option<ServeError>) {
        self.0.borrow_mut().push_back(verdict);
    }
}

/// How the message after a head is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Where in the byte stream the guard is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The first bytes: HTTP/2's preface or not yet known.
    Start,
    /// Between messages, or inside a head (held until it is complete).
    Head,
    /// A body of this many bytes still to come.
    Length(u64),
    /// A chunked body, at this point of hyper's decoder.
    Chunk(Chunk),
    /// Everything passes (HTTP/2, or after a framing error hyper will stop at).
    Through,
    /// A refusal was handed over: the stand-in went to hyper; nothing more is read.
    Refused,
}

/// hyper's chunked decoder states (`proto/h1/decode.rs`), which the guard follows byte by byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf { last: bool },
    Body(u64),
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// The guard around an HTTP/1.1 connection's stream.
pub(crate) struct Http1Guard<S> {
    inner: S,
    state: State,
    /// Head bytes held until the head is complete.
    head: Vec<u8>,
    /// Size digits of the current chunk.
    chunk_size: u64,
    /// Bytes ready for hyper.
    out: Vec<u8>,
    out_start: usize,
    verdicts: Rc<Verdicts>,
    headers_timeout: Duration,
    /// Running while a head is incomplete.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    eof: bool,
}

impl<S> Http1Guard<S> {
    pub(crate) fn new(inner: S, verdicts: Rc<Verdicts>, headers_timeout: Duration) -> Self {
        Self {
            inner,
            state: State::Start,
            head: Vec::new(),
            chunk_size: 0,
            out: Vec::new(),
            out_start: 0,
            verdicts,
            headers_timeout,
            deadline: None,
            eof: false,
        }
    }

    /// Runs `input` through the framing; what hyper may read goes to `out`.
    fn feed(&mut self, input: &[u8]) {
        let mut rest = input;
        while !rest.is_empty() {
            match self.state {
                State::Through => {
                    self.out.extend_from_slice(rest);
                    return;
                }
                State::Refused => return,
                State::Start => {
                    self.head.extend_from_slice(rest);
                    let seen = self.head.len().min(H2_PREFACE.len());
                    if self.head[..seen] != H2_PREFACE[..seen] {
                        self.state = State::Head;
                        let held = std::mem::take(&mut self.head);
                        self.feed(&held);
                    } else if seen == H2_PREFACE.len() {
                        self.state = State::Through;
                        let held = std::mem::take(&mut self.head);
                        self.out.extend_from_slice(&held);
                    }
                    return;
                }
                State::Head => rest = self.feed_head(rest),
                State::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(rest.len());
                    self.out.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunk(Chunk::Body(n)) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(rest.len());
                    self.out.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    let left = n - take as u64;
                    self.state = State::Chunk(if left == 0 {
                        Chunk::BodyCr
                    } else {
                        Chunk::Body(left)
                    });
                }
                State::Chunk(chunk) => {
                    let byte = rest[0];
                    rest = &rest[1..];
                    self.out.push(byte);
                    self.state = match self.chunk_step(chunk, byte) {
                        Some(Some(next)) => State::Chunk(next),
                        Some(None) => State::Head,
                        // hyper fails the body here and reads no further request: so does
                        // the guard.
                        None => State::Through,
                    };
                }
            }
        }
    }

    /// One byte of a chunked body, as hyper's decoder takes it: the next state, `Some(None)`
    /// at the end of the body, `None` where hyper's decoder fails.
    fn chunk_step(&mut self, chunk: Chunk, byte: u8) -> Option<Option<Chunk>> {
        let hex = |b: u8| char::from(b).to_digit(16).map(u64::from);
        Some(Some(match (chunk, byte) {
            (Chunk::Start, b) => {
                self.chunk_size = hex(b)?;
                Chunk::Size
            }
            (Chunk::Size, b) if hex(b).is_some() => {
                self.chunk_size = self.chunk_size.checked_mul(16)?.checked_add(hex(b)?)?;
                Chunk::Size
            }
            (Chunk::Size | Chunk::SizeLws, b'\t' | b' ') => Chunk::SizeLws,
            (Chunk::Size | Chunk::SizeLws, b';') => Chunk::Extension,
            (Chunk::Size | Chunk::SizeLws | Chunk::Extension, b'\r') => Chunk::SizeLf {
                last: self.chunk_size == 0,
            },
            (Chunk::Extension, b'\n') => return None,
            (Chunk::Extension, _) => Chunk::Extension,
            (Chunk::SizeLf { last: true }, b'\n') => Chunk::EndCr,
            (Chunk::SizeLf { last: false }, b'\n') => Chunk::Body(self.chunk_size),
            (Chunk::BodyCr, b'\r') => Chunk::BodyLf,
            (Chunk::BodyLf, b'\n') => Chunk::Start,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::Trailer, _) => Chunk::Trailer,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::EndCr, _) => Chunk::Trailer,
            (Chunk::EndLf, b'\n') => return Some(None),
            _ => return None,
        }))
    }

    /// Head bytes: held until the blank line, then checked; returns what follows the head.
    fn feed_head<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let mut rest = input;
        // Blank lines before a request line are skipped by hyper too.
        if self.head.is_empty() {
            let skip = rest
                .iter()
                .position(|b| *b != b'\r' && *b != b'\n')
                .unwrap_or(rest.len());
            self.out.extend_from_slice(&rest[..skip]);
            rest = &rest[skip..];
            if rest.is_empty() {
                return rest;
            }
            self.deadline = Some(Box::pin(tokio::time::sleep(self.headers_timeout)));
        }
        let before = self.head.len();
        self.head.extend_from_slice(rest);
        // The head ends at an empty line (LF or CRLF); search from just before the new bytes.
        let from = before.saturating_sub(3);
        let end = find_head_end(&self.head, from);
        let Some(end) = end else {
            if self.head.len() > MAX_REQUEST_HEADERS_BYTES as usize {
                self.refuse(ServeError::RequestHeaderFieldsTooLarge);
            }
            return &[];
        };
        if end > MAX_REQUEST_HEADERS_BYTES as usize {
            self.refuse(ServeError::RequestHeaderFieldsTooLarge);
            return &[];
        }
        let consumed_from_input = end - before;
        let head = std::mem::take(&mut self.head);
        let head = &head[..end];
        self.deadline = None;
        match check_head(head) {
            Ok(framing) => {
                self.verdicts.push(None);
                self.out.extend_from_slice(head);
                self.state = match framing {
                    Framing::None | Framing::Length(0) => State::Head,
                    Framing::Length(n) => State::Length(n),
                    Framing::Chunked => State::Chunk(Chunk::Start),
                };
                &rest[consumed_from_input..]
            }
            Err(refusal) => {
                self.refuse(refusal);
                &[]
            }
        }
    }

    fn refuse(&mut self, refusal: ServeError) {
        self.verdicts.push(Some(refusal));
        self.out.extend_from_slice(STAND_IN);
        self.head.clear();
        self.deadline = None;
        self.state = State::Refused;
    }
}

/// The end (exclusive) of a head: just past the LF of its empty line.
fn find_head_end(head: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(offset) = head[i..].iter().position(|b| *b == b'\n') {
        let lf = i + offset;
        // An LF right after another LF, or after CR LF: an empty line.
        let empty = (lf >= 1 && head[lf - 1] == b'\n')
            || (lf >= 2 && head[lf - 1] == b'\r' && head[lf - 2] == b'\n');
        if empty {
            return Some(lf + 1);
        }
        i = lf + 1;
    }
    None
}

/// The framing of a complete head, or why it is refused.
fn check_head(head: &[u8]) -> Result<Framing, ServeError> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let http10 = request_line.ends_with(b"HTTP/1.0");
    let mut fields = 0;
    let mut host = false;
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut codings: Option<&[u8]> = None;
    for line in lines {
        fields += 1;
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"host") {
            host = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // As hyper decides: the last Transfer-Encoding line says whether it is chunked.
            codings = Some(value);
        }
    }
    if too_many_header_fields(fields - usize::from(host)) {
        return Err(ServeError::RequestHeaderFieldsTooLarge);
    }
    if let Some(codings) = codings {
        if !lengths.is_empty() {
            return Err(ServeError::BadRequest(
                "both Content-Length and Transfer-Encoding".into(),
            ));
        }
        if http10 {
            return Err(ServeError::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request".into(),
            ));
        }
        let last = codings.rsplit(|b| *b == b',').next().map(trim);
        if !last.is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked")) {
            return Err(ServeError::BadRequest(
                "a transfer coding other than chunked".into(),
            ));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in lengths {
        let parsed = std::str::from_utf8(value)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ServeError::BadRequest("an unreadable Content-Length".into()))?;
        if length.is_some_and(|previous| previous != parsed) {
            return Err(ServeError::BadRequest(
                "differing Content-Length values".into(),
            ));
        }
        length = Some(parsed);
    }
    Ok(length.map_or(Framing::None, Framing::Length))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

impl<S: AsyncRead + Unpin> AsyncRead for Http1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_start < this.out.len() {
                let ready = &this.out[this.out_start..];
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.out_start += n;
                if this.out_start == this.out.len() {
                    // Freed, not kept: an idle keep-alive connection would otherwise hold its
                    // largest head (a few KB) until it closes.
                    this.out = Vec::new();
                    this.out_start = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Not the end of the stream: hyper would take that as the client leaving and drop
            // the answer. The stand-in asks hyper to close once it has answered.
            if this.state == State::Refused {
                return Poll::Pending;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The client is done: what is held goes to hyper as it is (an incomplete
                    // head, which hyper refuses).
                    this.eof = true;
                    this.deadline = None;
                    let held = std::mem::take(&mut this.head);
                    this.out.extend_from_slice(&held);
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    this.feed(&chunk[..n]);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let expired = this
                        .deadline
                        .as_mut()
                        .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                    if !expired {
                        return Poll::Pending;
                    }
                    this.refuse(ServeError::RequestTimeout);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Http1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
