//! yamux over the TLS stream, driven by one task per connection, with QUIC's close semantics on top.
//!
//! yamux has no close code or reason. Each side therefore opens one stream of its own first (the client's has
//! id 1, the server's id 2) and writes a byte on it; closing writes a close record there (`session.rs`) and
//! lingers until the peer, having read it, closes the connection (or [`CLOSE_LINGER`] passes). Every stream's
//! bytes written before the close precede the record on the wire, and yamux lets them be read after the
//! connection's end, so an Error followed by a close reaches the peer in order, as over QUIC.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use super::session::{read_close, CloseRecord, KEEPALIVE, OPENED};
use crate::Closed;

/// A multiplexed stream, with tokio's I/O traits.
pub type MuxStream = Compat<yamux::Stream>;

/// How often each side says it is still there, as QUIC's keep-alives (a proxy's or a NAT's idle timer would
/// otherwise end a tunnel during a long round), and how long a connection may hear nothing before it is
/// over: QUIC's idle timeout.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing side waits for the peer to read its close record and close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Streams the peer opened that wait to be accepted; more are reset.
const INBOUND_QUEUE: usize = 4;
/// Streams at once on a connection (a control stream and a few tasks are used).
const MAX_STREAMS: usize = 16;
/// The most memory the streams' receive windows of one connection may take: 32 MiB, as QUIC's.
const MAX_RECEIVE_WINDOW: usize = 32 * 1024 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A yamux connection's handle; its driver task owns the connection itself.
pub(crate) struct Mux {
    pub(crate) id: u64,
    pub(crate) remote: SocketAddr,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    commands: mpsc::UnboundedSender<Command>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<yamux::Stream>>,
    state: Arc<State>,
}

enum Command {
    Open(oneshot::Sender<Result<yamux::Stream, Closed>>),
    Close(CloseRecord),
}

/// What the handle and the driver share.
pub(crate) struct State {
    reason: Mutex<Option<Closed>>,
    ended: watch::Sender<bool>,
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
}

impl State {
    pub(crate) fn new() -> Arc<State> {
        Arc::new(State {
            reason: Mutex::new(None),
            ended: watch::channel(false).0,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        })
    }

    /// The first reason given is the one kept.
    fn settle(&self, reason: Closed) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
    }

    fn reason(&self) -> Option<Closed> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Mux {
    /// Starts yamux over `io` (TLS established) and its driver task.
    pub(crate) fn start<T>(
        io: T,
        mode: yamux::Mode,
        remote: SocketAddr,
        chain: Vec<CertificateDer<'static>>,
        state: Arc<State>,
    ) -> Arc<Mux>
    where
        T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = yamux::Config::default();
        config.set_max_num_streams(MAX_STREAMS);
        config.set_max_connection_receive_window(Some(MAX_RECEIVE_WINDOW));
        let connection = yamux::Connection::new(io, config, mode);
        let (commands, received) = mpsc::unbounded_channel();
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
        let (records_tx, records) = mpsc::unbounded_channel();
        let driver = Driver {
            connection,
            commands: received,
            inbound: inbound_tx,
            records_tx,
            records,
            peer_session: match mode {
                yamux::Mode::Client => 2,
                yamux::Mode::Server => 1,
            },
            session: None,
            opens: VecDeque::new(),
            phase: Phase::Open,
            keepalive: {
                let mut every = tokio::time::interval(KEEPALIVE_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            },
            heard: (0, tokio::time::Instant::now()),
            state: state.clone(),
        };
        tokio::spawn(driver.run());
        Arc::new(Mux {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            remote,
            chain,
            commands,
            inbound: tokio::sync::Mutex::new(inbound),
            state,
        })
    }

    pub(crate) async fn open(&self) -> Result<MuxStream, Closed> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Open(tx)).is_err() {
            return Err(self.ended_reason());
        }
        match rx.await {
            Ok(Ok(stream)) => Ok(stream.compat()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.ended_reason()),
        }
    }

    pub(crate) async fn accept(&self) -> Result<MuxStream, Closed> {
        match self.inbound.lock().await.recv().await {
            Some(stream) => Ok(stream.compat()),
            None => Err(self.closed().await),
        }
    }

    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        self.state.settle(Closed::Locally);
        let _ = self
            .commands
            .send(Command::Close(CloseRecord::new(code, reason)));
    }

    pub(crate) fn reason(&self) -> Option<Closed> {
        self.state.reason()
    }

    pub(crate) async fn closed(&self) -> Closed {
        let mut ended = self.state.ended.subscribe();
        // The sender lives in `state`, which this handle holds: `wait_for` ends only when the driver ends.
        let _ = ended.wait_for(|e| *e).await;
        self.ended_reason()
    }

    fn ended_reason(&self) -> Closed {
        self.state
            .reason()
            .unwrap_or_else(|| Closed::Lost("the connection ended".into()))
    }

    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.state.received.load(Ordering::Relaxed),
            self.state.sent.load(Ordering::Relaxed),
        )
    }
}

enum Phase {
    Open,
    /// Writing our close record, then waiting for the peer to close.
    Closing {
        record: Vec<u8>,
        written: usize,
        linger: Pin<Box<tokio::time::Sleep>>,
    },
    /// Ending: the connection is dropped.
    ShuttingDown,
}

struct Driver<T> {
    connection: yamux::Connection<T>,
    commands: mpsc::UnboundedReceiver<Command>,
    inbound: mpsc::Sender<yamux::Stream>,
    records_tx: mpsc::UnboundedSender<CloseRecord>,
    records: mpsc::UnboundedReceiver<CloseRecord>,
    /// The id of the peer's first stream: its session stream.
    peer_session: u32,
    /// Our session stream, where our close record goes.
    session: Option<yamux::Stream>,
    opens: VecDeque<oneshot::Sender<Result<yamux::Stream, Closed>>>,
    phase: Phase,
    keepalive: tokio::time::Interval,
    /// Bytes received when they last grew, and when.
    heard: (u64, tokio::time::Instant),
    state: Arc<State>,
}

impl<T> Driver<T>
where
    T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin + Send + 'static,
{
    async fn run(mut self) {
        let outcome = match self.open_session().await {
            Ok(()) => poll_fn(|cx| self.poll(cx)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &outcome {
            self.state.settle(reason_of(e));
        }
        self.state
            .settle(Closed::Lost("the peer closed the connection".into()));
        for open in self.opens.drain(..) {
            let _ = open.send(Err(self.state.reason().unwrap_or(Closed::Locally)));
        }
        // Streams see their end only now that the reason is settled.
        drop(self.connection);
        self.state.ended.send_replace(true);
    }

    /// Opens this side's session stream, the first stream of the connection, and sends its first byte.
    async fn open_session(&mut self) -> Result<(), yamux::ConnectionError> {
        let stream = poll_fn(|cx| self.connection.poll_new_outbound(cx)).await?;
        let mut stream = stream.compat();
        stream
            .write_all(&[OPENED])
            .await
            .map_err(yamux::ConnectionError::Io)?;
        self.session = Some(stream.into_inner());
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
        loop {
            self.take_commands(cx);
            if let Poll::Ready(Some(record)) = self.records.poll_recv(cx) {
                self.state.settle(Closed::Application {
                    code: u64::from(record.code),
                    reason: record.reason,
                });
                self.phase = Phase::ShuttingDown;
            }
            match &mut self.phase {
                Phase::Open => {
                    // Until it is pending, so that the next tick wakes this task.
                    let mut ended = false;
                    while !ended && self.keepalive.poll_tick(cx).is_ready() {
                        ended = self.keep_alive(cx);
                    }
                    if ended {
                        continue;
                    }
                }
                Phase::Closing {
                    record,
                    written,
                    linger,
                } => {
                    if *written < record.len() {
                        let Some(session) = self.session.as_mut() else {
                            self.phase = Phase::ShuttingDown;
                            continue;
                        };
                        match futures_io::AsyncWrite::poll_write(
                            Pin::new(session),
                            cx,
                            &record[*written..],
                        ) {
                            Poll::Ready(Ok(n)) if n > 0 => {
                                *written += n;
                                continue;
                            }
                            Poll::Ready(_) => {
                                self.phase = Phase::ShuttingDown;
                                continue;
                            }
                            Poll::Pending => {}
                        }
                    }
                    if linger.as_mut().poll(cx).is_ready() {
                        self.phase = Phase::ShuttingDown;
                        continue;
                    }
                }
                // Dropped while active (in `run`), yamux closes every stream and wakes its readers, who
                // still read what had arrived; a graceful yamux close would leave them waiting.
                Phase::ShuttingDown => return Poll::Ready(Ok(())),
            }
            if let Err(e) = self.serve_opens(cx) {
                return Poll::Ready(Err(e));
            }
            return self.poll_inbound(cx);
        }
    }

    /// Every [`KEEPALIVE_EVERY`]: a keep-alive byte to the peer, and the end of a connection that has heard
    /// nothing for [`IDLE_TIMEOUT`]. Whether the phase changed.
    fn keep_alive(&mut self, cx: &mut Context<'_>) -> bool {
        let received = self.state.received.load(Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        if received != self.heard.0 {
            self.heard = (received, now);
        } else if now.duration_since(self.heard.1) >= IDLE_TIMEOUT {
            self.state.settle(Closed::TimedOut);
            self.phase = Phase::ShuttingDown;
            return true;
        }
        if let Some(session) = self.session.as_mut() {
            // Best effort: a full window means bytes are flowing anyway.
            let _ = futures_io::AsyncWrite::poll_write(Pin::new(session), cx, &[KEEPALIVE]);
        }
        false
    }

    fn take_commands(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(command) = self.commands.poll_recv(cx) {
            match command {
                Some(Command::Open(tx)) => self.opens.push_back(tx),
                Some(Command::Close(record)) => {
                    if matches!(self.phase, Phase::Open) {
                        self.phase = Phase::Closing {
                            record: record.encode(),
                            written: 0,
                            linger: Box::pin(tokio::time::sleep(CLOSE_LINGER)),
                        };
                    }
                }
                // Every handle is gone: close without a reason, as a dropped QUIC connection does.
                None => {
                    if matches!(self.phase, Phase::Open) {
                        self.phase = Phase::Closing {
                            record: CloseRecord::new(0, b"").encode(),
                            written: 0,
                            linger: Box::pin(tokio::time::sleep(CLOSE_LINGER)),
                        };
                    }
                    return;
                }
            }
        }
    }

    fn serve_opens(&mut self, cx: &mut Context<'_>) -> Result<(), yamux::ConnectionError> {
        while let Some(open) = self.opens.front() {
            if open.is_closed() {
                self.opens.pop_front();
                continue;
            }
            if !matches!(self.phase, Phase::Open) {
                if let Some(open) = self.opens.pop_front() {
                    let _ = open.send(Err(self.state.reason().unwrap_or(Closed::Locally)));
                }
                continue;
            }
            match self.connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    if let Some(open) = self.opens.pop_front() {
                        let _ = open.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Drives the connection's I/O and takes the streams the peer opens.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
        loop {
            match self.connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if stream.id().val() == self.peer_session {
                        let records = self.records_tx.clone();
                        tokio::spawn(async move {
                            if let Some(record) = read_close(stream.compat()).await {
                                let _ = records.send(record);
                            }
                        });
                    } else if matches!(self.phase, Phase::Open) {
                        // A full queue resets the stream (it is dropped unaccepted).
                        let _ = self.inbound.try_send(stream);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Why a yamux connection failed, as QUIC would say it.
fn reason_of(e: &yamux::ConnectionError) -> Closed {
    if let Some(alert) = crate::alert_in_chain(e) {
        return Closed::TlsAlert {
            alert,
            reason: e.to_string(),
        };
    }
    let io = match e {
        yamux::ConnectionError::Io(io) => Some(io),
        yamux::ConnectionError::Decode(yamux::FrameDecodeError::Io(io)) => Some(io),
        _ => None,
    };
    match io.map(std::io::Error::kind) {
        Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted) => {
            Closed::Reset
        }
        Some(std::io::ErrorKind::TimedOut) => Closed::TimedOut,
        _ => Closed::Lost(e.to_string()),
    }
}
