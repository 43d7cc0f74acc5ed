//! The load generator: `connections` closed-loop HTTP/1.1 keep-alive clients on the bench
//! process's one thread (pinned to the core the gateway does not use), each sending the same
//! request as fast as the answers come. Its own CPU time is measured like the gateways', so its
//! share of the machine is in the report. A load can be paused and resumed with its
//! connections held open, so that several take turns within one window (see `measure_window`).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::cell::{Cell, RefCell};

/// What every client sends (one prepared request, cloned per send).
#[derive(Clone)]
pub(crate) struct RequestShape {
    /// Path and query.
    pub(crate) path: String,
    /// Headers, in order.
    pub(crate) headers: Vec<(&'static str, String)>,
}

/// Where the load goes.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    /// TLS (with the bench user's certificate offered), or plain HTTP.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the server's certificate must carry.
    pub(crate) server_name: String,
}

/// Whether the clients send.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    Paused,
    Sending,
    Stopped,
}

/// Shared between the clients and the conductor (one thread: `Rc`/`Cell`).
#[derive(Default)]
struct Shared {
    measuring: Cell<bool>,
    latencies_us: RefCell<Vec<u32>>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
}

/// A load: clients connected, sending or paused; [`Load::open_window`] starts counting.
pub(crate) struct Load {
    shared: Rc<Shared>,
    turn: tokio::sync::watch::Sender<Turn>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What one measured window saw.
pub(crate) struct Window {
    /// The time the clients were sending in the window.
    pub(crate) elapsed: Duration,
    /// Answered requests (status 200) in the window, with their latencies.
    pub(crate) latencies_us: Vec<u32>,
    /// Requests that failed (any status but 200, or a transport error), in or out of the window.
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Load {
    /// Connects `connections` clients to `endpoint`; they start sending at once (the warm-up).
    /// Must run inside a `LocalSet`.
    pub(crate) async fn start(
        endpoint: &Endpoint,
        shape: &RequestShape,
        connections: usize,
    ) -> Result<Self> {
        let load = Self::connect_paused(endpoint, shape, connections).await?;
        load.resume();
        Ok(load)
    }

    /// Connects `connections` clients to `endpoint`, paused until [`Load::resume`].
    pub(crate) async fn connect_paused(
        endpoint: &Endpoint,
        shape: &RequestShape,
        connections: usize,
    ) -> Result<Self> {
        let shared = Rc::new(Shared::default());
        let (turn, _) = tokio::sync::watch::channel(Turn::Paused);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let sender = connect(endpoint).await?;
            let (shared, shape) = (shared.clone(), shape.clone());
            tasks.push(tokio::task::spawn_local(client(
                sender,
                shape,
                shared,
                turn.subscribe(),
            )));
        }
        Ok(Self {
            shared,
            turn,
            tasks,
        })
    }

    /// The clients send as fast as the answers come.
    pub(crate) fn resume(&self) {
        self.turn.send_replace(Turn::Sending);
    }

    /// The clients send nothing new; requests in flight are still answered (and counted).
    pub(crate) fn pause(&self) {
        self.turn.send_replace(Turn::Paused);
    }

    /// Marks the start of the measured window.
    pub(crate) fn open_window(&self) -> Instant {
        self.shared.latencies_us.borrow_mut().clear();
        self.shared.measuring.set(true);
        Instant::now()
    }

    /// Closes the window, stops the clients and returns what the window saw; `elapsed` is
    /// the time the clients were sending in it.
    pub(crate) async fn finish(self, elapsed: Duration) -> Window {
        self.shared.measuring.set(false);
        self.turn.send_replace(Turn::Stopped);
        for task in self.tasks {
            let _ = task.await;
        }
        Window {
            elapsed,
            latencies_us: self.shared.latencies_us.take(),
            errors: self.shared.errors.get(),
            first_error: self.shared.first_error.take(),
        }
    }
}

/// Opens `connections` connections and sends one request on each, one connection after
/// another; returns them open and idle.
pub(crate) async fn open_idle(
    endpoint: &Endpoint,
    shape: &RequestShape,
    connections: usize,
) -> Result<Vec<Sender>> {
    let mut open = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut sender = connect(endpoint).await?;
        send(&mut sender, shape).await?;
        open.push(sender);
    }
    Ok(open)
}

/// Opens `connections` new connections, then sends one request on each, all at once; fails
/// unless every one is answered 200. Returns the time from the first send to the last answer.
pub(crate) async fn concurrent_once(
    endpoint: &Endpoint,
    shape: &RequestShape,
    connections: usize,
) -> Result<Duration> {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(endpoint).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let shape = shape.clone();
            tokio::task::spawn_local(async move { send(&mut sender, &shape).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(endpoint: &Endpoint) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(endpoint.addr)
        .await
        .with_context(|| format!("connecting to {}", endpoint.addr))?;
    tcp.set_nodelay(true)?;
    match &endpoint.tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(endpoint.server_name.clone())?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            http1(stream).await
        }
        None => http1(tcp).await,
    }
}

/// An HTTP/1.1 client over `io`, its connection driven by a local task.
async fn http1<Io>(io: Io) -> Result<Sender>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::task::spawn_local(connection);
    Ok(sender)
}

async fn client(
    mut sender: Sender,
    shape: RequestShape,
    shared: Rc<Shared>,
    mut turn: tokio::sync::watch::Receiver<Turn>,
) {
    loop {
        match turn.wait_for(|turn| *turn != Turn::Paused).await {
            Ok(turn) if *turn == Turn::Sending => {}
            // Stopped, or the load dropped.
            _ => return,
        }
        let started = Instant::now();
        match send(&mut sender, &shape).await {
            Ok(()) => {
                if shared.measuring.get() {
                    let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                    shared.latencies_us.borrow_mut().push(us);
                }
            }
            Err(error) => {
                shared.errors.set(shared.errors.get() + 1);
                shared
                    .first_error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("{error:#}"));
                // A broken connection stays broken: this client stops.
                return;
            }
        }
    }
}

async fn send(sender: &mut Sender, shape: &RequestShape) -> Result<()> {
    let mut request = http::Request::get(shape.path.as_str());
    for (name, value) in &shape.headers {
        request = request.header(*name, value.as_str());
    }
    let response = sender.send_request(request.body(Empty::new())?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != 200 {
        bail!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(())
}
