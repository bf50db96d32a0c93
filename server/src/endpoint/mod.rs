//! The QUIC endpoint: accepts connections, identifies each peer by its certificate, runs admission on its
//! Hello and keeps the admitted centres. One task per connection: whatever one peer does, the others are
//! served.

mod connection;
mod driver;
mod exchange;
mod status;
mod strangers;

pub use strangers::HandshakeLimits;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedslm_certs::{
    alert_name, quic_server_config, serial_of, server_config_with_verifier, CertError,
    ReloadingClientVerifier,
};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::{
    close, ByteBudget, CenterId, ErrorCode, Finish, Limits, PlacementTask, Role,
};
use fedslm_transport::{tcp, Link, Transport};
use quinn::{Endpoint, VarInt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::aggregate::UpdateRefusal;
use crate::audit::AuditEvent;
use crate::config::ServerConfig;
use crate::evaluation::Evaluation;
use crate::metrics::Metrics;
use crate::round::{Coordinator, Input, Outcome, PlacementAnswer, RoundRecord};
use crate::store::Store;
use driver::{Driver, Durable, Ended};
use strangers::{Gate, Screening, Tally, TALLY_INTERVAL};

/// How often the server looks at the CRL file for a change that revokes a connected centre.
const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// How long a control frame's payload (64 KiB at most) may take once its header is in.
const CONTROL_FRAME_WITHIN: Duration = Duration::from_secs(10);
/// How long a refused peer has to read its Error before the connection is closed.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// Writes a round's global model as a file at the path given (the store then names it by its hash and records
/// it). Runs on a blocking thread; an error stops the run.
pub type CheckpointWriter = Box<
    dyn FnMut(
            &RoundRecord,
            &fedslm_protocol::Weights,
            &Path,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

/// How long the centres have to take their Finish and close before the server stops.
const FINISH_LINGER: Duration = Duration::from_secs(5);
/// Stream reset code of a task whose round closed without it.
const TASK_CANCELLED: u32 = 1;

/// What the server saw, for logs, tests and (later) the round state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// TLS or QUIC handshake failed (no, unknown, expired, revoked or misused certificate; wrong ALPN).
    HandshakeFailed {
        remote: SocketAddr,
        alert: Option<u8>,
        reason: String,
    },
    /// A verified peer was refused admission, with the code and message it was sent.
    Refused {
        remote: SocketAddr,
        center: CenterId,
        code: ErrorCode,
        reason: String,
    },
    Admitted {
        remote: SocketAddr,
        center: CenterId,
        role: Role,
        transport: Transport,
        /// The SHA-256 of the centre's disclosure policy, from its Hello.
        policy_hash: [u8; 32],
    },
    Disconnected {
        center: CenterId,
        reason: String,
    },
    /// A newer connection of `center` (from `remote`) replaced the one from `previous`.
    Superseded {
        center: CenterId,
        previous: SocketAddr,
        remote: SocketAddr,
    },
    /// A connected centre's certificate was revoked; its connection was closed.
    Revoked {
        center: CenterId,
        remote: SocketAddr,
        serial: String,
    },
    /// A round's new global model, with who contributed what.
    RoundCommitted(RoundRecord),
    /// An evaluation round's aggregates, stored with its round.
    Evaluated(Evaluation),
    /// The run is over; the centres were sent Finish.
    Finished(Outcome),
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this server has run its machine already: one run per server")]
    RanAlready,
    #[error("the run stopped before its end")]
    Stopped,
}

struct Admitted {
    connection: Link,
    /// Shared by every stream of the connection.
    budget: ByteBudget,
    /// The run's end, for the connection's task to send on the control stream.
    finish: mpsc::Sender<Finish>,
    /// The patients its Hello declared.
    declared: fedslm_protocol::SampleCounts,
}

/// The coordinator's verdict on an answer: taken, or refused and why.
type Verdict = Result<(), UpdateRefusal>;

/// An input for the coordinator, with where its verdict goes (an answer's acceptance or refusal).
struct Envelope {
    input: Input,
    verdict: Option<oneshot::Sender<Verdict>>,
}

struct Shared {
    config: ServerConfig,
    /// The TLS client verifier, whose CRL the connected centres are checked against when it changes.
    verifier: Arc<ReloadingClientVerifier>,
    limits: Limits,
    events: broadcast::Sender<ServerEvent>,
    peers: Mutex<HashMap<CenterId, Admitted>>,
    inputs: mpsc::UnboundedSender<Envelope>,
    /// The run's durable record; every event goes into its audit log.
    store: std::sync::OnceLock<Arc<Store>>,
    /// Once the run is over: the Finish that every centre admitted from then on is sent at once.
    finished: Mutex<Option<Finish>>,
    /// Centres that were sent Finish.
    told: Mutex<BTreeSet<CenterId>>,
    /// Bumped whenever `peers` or `told` change, for whoever waits on them.
    changed: watch::Sender<()>,
    /// Handshakes in flight, within their limits.
    gate: Arc<Gate>,
    /// Failed handshakes since the last audit entry of them.
    tally: Mutex<Tally>,
    metrics: Metrics,
    /// TLS over TCP's acceptor (the QUIC endpoint's TLS configuration), with `tcp_listen`.
    acceptor: Option<tcp::Acceptor>,
}

impl Shared {
    /// Wakes whoever waits for the connected centres to change.
    fn peers_changed(&self) {
        self.changed.send_replace(());
    }

    /// Waits until `done` holds or `deadline` passes; `done` is checked again at every change of the
    /// connected centres.
    async fn wait_for(&self, deadline: tokio::time::Instant, done: impl Fn() -> bool) {
        let mut changes = self.changed.subscribe();
        while !done() {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    fn tell(&self, input: Input) {
        // A failed task's reason may be a peer's text: escaped before it reaches the log or the audit.
        let input = match input {
            Input::TaskFailed {
                center,
                task,
                reason,
            } => Input::TaskFailed {
                center,
                task,
                reason: escape_peer(&reason),
            },
            other => other,
        };
        // The coordinator is gone only when the run is over.
        let _ = self.inputs.send(Envelope {
            input,
            verdict: None,
        });
    }
}

impl Shared {
    fn audit(&self, event: AuditEvent) {
        if let Some(store) = self.store.get() {
            if let Err(e) = store.audit(event) {
                tracing::error!(error = %e, "cannot append to the audit log");
            }
        }
    }

    /// Counts a failed or ignored handshake for the interval's audit entry and the metrics (by a bounded
    /// class: an alert's name, a timeout, a limit).
    fn count_stranger(&self, reason: &str, remote: SocketAddr) {
        lock(&self.tally).count(reason, remote.ip());
        let class = if reason.starts_with("no handshake within") {
            "timeout"
        } else if reason.starts_with("too many handshakes") {
            "limit"
        } else if reason.chars().all(|c| c.is_ascii_alphanumeric()) {
            reason
        } else {
            "other"
        };
        self.metrics.handshake_failed(class);
    }

    /// The metrics' text now, with the connected centres' figures.
    fn scrape(&self) -> String {
        let (mut received, mut sent) = (0, 0);
        let mut connected: Vec<(Transport, i64)> = Transport::ALL.iter().map(|t| (*t, 0)).collect();
        let peers = lock(&self.peers);
        for p in peers.values() {
            let (rx, tx) = p.connection.bytes();
            received += rx;
            sent += tx;
            if let Some(c) = connected
                .iter_mut()
                .find(|(t, _)| *t == p.connection.transport())
            {
                c.1 += 1;
            }
        }
        drop(peers);
        self.metrics.encode(&connected, received, sent)
    }

    /// Audits (and logs) the failed handshakes counted since the last time.
    fn audit_strangers(&self) {
        let entry = lock(&self.tally).take(Instant::now());
        if let Some(entry) = entry {
            if let AuditEvent::HandshakesFailed {
                seconds,
                total,
                addresses,
                by_reason,
                ..
            } = &entry
            {
                tracing::warn!(total, addresses, seconds, ?by_reason, "handshakes failed");
            }
            self.audit(entry);
        }
    }

    fn emit(&self, event: ServerEvent) {
        let event = escaped(event);
        if let Some(entry) = audit_event(&event) {
            self.audit(entry);
        }
        match &event {
            ServerEvent::HandshakeFailed {
                remote,
                alert,
                reason,
            } => {
                // One line and one audit entry per interval, not per attempt: strangers are many.
                let class = match alert {
                    Some(a) => alert_name(*a),
                    None => reason.chars().take(60).collect(),
                };
                self.count_stranger(&class, *remote);
                tracing::debug!(%remote, alert = alert.map(alert_name), %reason, "handshake failed")
            }
            ServerEvent::Refused {
                remote,
                center,
                code,
                reason,
            } => {
                self.metrics.refused("admission", &format!("{code:?}"));
                tracing::warn!(%remote, %center, %reason, "refused")
            }
            ServerEvent::Admitted {
                remote,
                center,
                role,
                transport,
                policy_hash,
            } => {
                let policy = fedslm_protocol::hex::to_hex(policy_hash);
                tracing::info!(%remote, %center, ?role, %transport, %policy, "admitted")
            }
            ServerEvent::Disconnected { center, reason } => {
                tracing::info!(%center, %reason, "disconnected")
            }
            ServerEvent::Superseded {
                center,
                previous,
                remote,
            } => {
                tracing::warn!(%center, %previous, %remote, "a newer connection of this centre took over")
            }
            ServerEvent::Revoked {
                center,
                remote,
                serial,
            } => {
                tracing::warn!(%center, %remote, %serial, "certificate revoked; connection closed")
            }
            ServerEvent::RoundCommitted(r) => {
                self.metrics.round_committed(r.duration);
                tracing::info!(
                    round = r.round,
                    centers = r.contributions.len(),
                    "round committed"
                )
            }
            ServerEvent::Evaluated(e) => {
                let record = e.record();
                self.metrics.evaluated(
                    e.round,
                    record.internal.and_then(|a| a.auc),
                    record.external.and_then(|a| a.auc),
                );
                tracing::info!(
                    round = e.round,
                    centers = e.centers.len(),
                    "round evaluated"
                )
            }
            ServerEvent::Finished(Outcome::Completed { rounds, .. }) => {
                tracing::info!(rounds, "run completed")
            }
            ServerEvent::Finished(Outcome::Failed { rounds, reason }) => {
                tracing::error!(rounds, %reason, "run failed")
            }
        }
        // No subscriber is fine: events are also logged.
        let _ = self.events.send(event);
    }
}

/// A connection event with the texts a peer can put in it (close reasons, handshake errors, refusals that
/// quote its Hello, an abort's message) escaped.
fn escaped(event: ServerEvent) -> ServerEvent {
    match event {
        ServerEvent::HandshakeFailed {
            remote,
            alert,
            reason,
        } => ServerEvent::HandshakeFailed {
            remote,
            alert,
            reason: escape_peer(&reason),
        },
        ServerEvent::Refused {
            remote,
            center,
            code,
            reason,
        } => ServerEvent::Refused {
            remote,
            center,
            code,
            reason: escape_peer(&reason),
        },
        ServerEvent::Disconnected { center, reason } => ServerEvent::Disconnected {
            center,
            reason: escape_peer(&reason),
        },
        other => other,
    }
}

/// The audit log's entry for a connection event; rounds are audited where the coordinator decides them.
fn audit_event(event: &ServerEvent) -> Option<AuditEvent> {
    Some(match event {
        // Counted, and audited once per interval ([`Shared::audit_strangers`]).
        ServerEvent::HandshakeFailed { .. } => return None,
        ServerEvent::Refused {
            remote,
            center,
            reason,
            ..
        } => AuditEvent::CenterRefused {
            center: center.to_string(),
            remote: remote.to_string(),
            reason: reason.clone(),
        },
        ServerEvent::Admitted {
            remote,
            center,
            role,
            transport,
            policy_hash,
        } => AuditEvent::CenterJoined {
            center: center.to_string(),
            role: role.name().into(),
            remote: remote.to_string(),
            transport: transport.name().into(),
            policy_hash: fedslm_protocol::hex::to_hex(policy_hash),
        },
        ServerEvent::Disconnected { center, reason } => AuditEvent::CenterLeft {
            center: center.to_string(),
            reason: reason.clone(),
        },
        ServerEvent::Superseded {
            center,
            previous,
            remote,
        } => AuditEvent::CenterSuperseded {
            center: center.to_string(),
            previous_remote: previous.to_string(),
            remote: remote.to_string(),
        },
        ServerEvent::Revoked {
            center,
            remote,
            serial,
        } => AuditEvent::CenterRevoked {
            center: center.to_string(),
            remote: remote.to_string(),
            serial: serial.clone(),
        },
        ServerEvent::RoundCommitted(_) | ServerEvent::Evaluated(_) | ServerEvent::Finished(_) => {
            return None
        }
    })
}

/// The coordinating server's endpoint.
pub struct Server {
    endpoint: Endpoint,
    /// TLS over TCP's listener, with `tcp_listen`.
    tcp: Option<tokio::net::TcpListener>,
    shared: Arc<Shared>,
    inputs: Mutex<Option<mpsc::UnboundedReceiver<Envelope>>>,
    /// The HTTP listener of the metrics, with `metrics_listen`.
    metrics: Option<tokio::net::TcpListener>,
}

impl Server {
    /// Loads the TLS files and binds the UDP socket. Must be called within a tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let (tls, verifier) = server_config_with_verifier(&config.tls)?;
        // One TLS configuration (certificate, ALPN, the verifier with its CRL) for both transports.
        let acceptor = config.tcp_listen.map(|_| tcp::acceptor(tls.clone()));
        let quic = quic_server_config(tls)?;
        let bind_err = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = fedslm_certs::udp_socket(config.listen).map_err(bind_err)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind_err(std::io::Error::other(
                "no async runtime to drive the endpoint",
            ))
        })?;
        let endpoint = Endpoint::new(
            fedslm_certs::server_endpoint_config(&config.tls)?,
            Some(quic),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let (events, _) = broadcast::channel(1024);
        let config_handshakes = config.handshakes;
        let metrics = config.metrics_listen.map(listen_tcp).transpose()?;
        let tcp = config.tcp_listen.map(listen_tcp).transpose()?;
        let (inputs, received) = mpsc::unbounded_channel();
        Ok(Server {
            endpoint,
            tcp,
            shared: Arc::new(Shared {
                config,
                verifier,
                limits: Limits::default(),
                events,
                peers: Mutex::new(HashMap::new()),
                inputs,
                store: std::sync::OnceLock::new(),
                finished: Mutex::new(None),
                told: Mutex::new(BTreeSet::new()),
                changed: watch::channel(()).0,
                gate: Gate::new(config_handshakes),
                tally: Mutex::new(Tally::new(Instant::now())),
                metrics: Metrics::new(),
                acceptor,
            }),
            inputs: Mutex::new(Some(received)),
            metrics,
        })
    }

    /// QUIC's UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// TLS over TCP's address, with `tcp_listen`.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the metrics are served, with `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }

    /// The centres admitted and still connected.
    pub fn connected(&self) -> Vec<CenterId> {
        let mut ids: Vec<CenterId> = lock(&self.shared.peers).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Admits centres until `shutdown` completes, then closes every connection. No rounds.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        // Nobody coordinates: the connections' inputs go nowhere.
        drop(lock(&self.inputs).take());
        self.serve_until(shutdown).await;
    }

    /// Runs the federation of `coordinator` until it finishes (the outcome) or `shutdown` completes (`None`).
    /// Each round is committed to `store` (its model written by `checkpoint`) before anything else happens, and
    /// every event goes into the store's audit log. Can be called once per server.
    pub async fn run_rounds(
        &self,
        coordinator: Coordinator,
        store: Arc<Store>,
        checkpoint: CheckpointWriter,
        shutdown: impl Future<Output = ()>,
    ) -> Option<Outcome> {
        let inputs = lock(&self.inputs).take()?;
        let _ = self.shared.store.set(store.clone());
        // A resumed run with nothing left to do: the centres that reconnect are told it is over.
        let already_over = coordinator.is_finished();
        let durable = Durable {
            store,
            checkpoint: Arc::new(Mutex::new(checkpoint)),
        };
        let driver = Driver::new(self.shared.clone(), coordinator, inputs, Some(durable));
        match self.drive(driver, already_over, shutdown).await? {
            Ended::Run(outcome) => Some(outcome),
            Ended::Placed(_) => unreachable!("a run's machine never finishes a second pass"),
        }
    }

    /// The second pass of paired comparisons (DESIGN.md §3), as a phase of the round machine
    /// ([`Coordinator::placements`]): once every centre named is connected (or `deadline` has passed), each
    /// gets its task on a fresh stream; the answers come back in the tasks' order, or why there is none. Then
    /// every centre is told the run is over. No rounds, no store: the comparisons are computed from the
    /// answers by [`crate::evaluation::paired_comparison`]. Can be called once per server.
    pub async fn run_placements(
        &self,
        tasks: Vec<(CenterId, PlacementTask)>,
        deadline: Duration,
    ) -> Result<Vec<PlacementAnswer>, ServerError> {
        let inputs = lock(&self.inputs).take().ok_or(ServerError::RanAlready)?;
        let roles = self.shared.config.enrolment.centers.clone();
        let secure = self.shared.config.run.secure_threshold;
        let machine = Coordinator::placements(roles, tasks, deadline, secure, Instant::now());
        let driver = Driver::new(self.shared.clone(), machine, inputs, None);
        match self.drive(driver, false, std::future::pending()).await {
            Some(Ended::Placed(answers)) => Ok(answers),
            _ => Err(ServerError::Stopped),
        }
    }

    /// Serves connections while `driver` runs the machine, then lets the centres take their Finish.
    async fn drive(
        &self,
        driver: Driver,
        already_over: bool,
        shutdown: impl Future<Output = ()>,
    ) -> Option<Ended> {
        let (done_tx, done_rx) = oneshot::channel();
        let running = tokio::spawn(async move {
            let outcome = driver.run().await;
            let _ = done_tx.send(outcome);
        });
        let mut done = std::pin::pin!(done_rx);
        let outcome = Mutex::new(None);
        self.serve_until(async {
            tokio::select! {
                o = &mut done => {
                    if let Ok(o) = o {
                        *lock(&outcome) = Some(o);
                    }
                    self.linger(already_over).await;
                }
                () = shutdown => {}
            }
        })
        .await;
        running.abort();
        outcome.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// After the end: until the centres have taken their Finish and closed (at most [`FINISH_LINGER`]), and
    /// for a run that was over before it began, until every enrolled centre was told (at most the start
    /// grace).
    async fn linger(&self, already_over: bool) {
        let shared = &self.shared;
        let now = tokio::time::Instant::now();
        shared
            .wait_for(now + FINISH_LINGER, || lock(&shared.peers).is_empty())
            .await;
        if already_over {
            let enrolled: BTreeSet<CenterId> =
                shared.config.enrolment.centers.keys().cloned().collect();
            shared
                .wait_for(now + shared.config.run.start_grace, || {
                    *lock(&shared.told) == enrolled
                })
                .await;
        }
    }

    async fn serve_until(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut crl = tokio::time::interval(REVOCATION_POLL);
        crl.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checked = self.shared.verifier.refresh();
        // The first tally after one whole interval: an interval's first tick is at once, which would audit
        // the first stranger alone if it came before the loop first looked at the clock.
        let mut tally =
            tokio::time::interval_at(tokio::time::Instant::now() + TALLY_INTERVAL, TALLY_INTERVAL);
        tally.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    self.screen(incoming);
                }
                Some(accepted) = accept_on(self.tcp.as_ref()) => {
                    if let Ok((stream, remote)) = accepted {
                        self.screen_tcp(stream, remote);
                    }
                }
                _ = tally.tick() => self.shared.audit_strangers(),
                Some(Ok((stream, _))) = accept_on(self.metrics.as_ref()) => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        crate::metrics::answer(stream, || shared.scrape()).await
                    });
                }
                _ = crl.tick() => {
                    let loaded = self.shared.verifier.refresh();
                    if loaded != checked {
                        checked = loaded;
                        close_revoked(&self.shared);
                    }
                }
                () = &mut shutdown => break,
            }
        }
        self.shared.audit_strangers();
        // Every connection is closed with the reason, whichever its transport (the endpoint closes QUIC's).
        let links: Vec<Link> = lock(&self.shared.peers)
            .values()
            .map(|p| p.connection.clone())
            .collect();
        for link in &links {
            link.close(close::SHUTDOWN, b"server shutting down");
        }
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"server shutting down");
        // Give the close frames a moment to leave; peers time out otherwise.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.endpoint.wait_idle().await;
            for link in &links {
                link.closed().await;
            }
        })
        .await;
    }
}

impl Server {
    /// An attempt from an address not validated gets a Retry; a validated one a handshake within the limits,
    /// on a task of its own, or nothing.
    fn screen(&self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated() || !incoming.may_retry();
        match self.shared.gate.screen(remote.ip(), validated) {
            Screening::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            Screening::Ignore(reason) => {
                incoming.ignore();
                self.shared.count_stranger(reason, remote);
            }
            Screening::Handshake(slot) => {
                let shared = self.shared.clone();
                tokio::spawn(async move { connection::serve_quic(shared, incoming, slot).await });
            }
        }
    }

    /// A TCP connection: its handshake within the same limits as QUIC's (TCP's own handshake has validated
    /// the address), or it is closed at once.
    fn screen_tcp(&self, stream: tokio::net::TcpStream, remote: SocketAddr) {
        let Some(acceptor) = self.shared.acceptor.clone() else {
            return;
        };
        match self.shared.gate.screen(remote.ip(), true) {
            Screening::Handshake(slot) => {
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    connection::serve_tcp(shared, stream, remote, acceptor, slot).await
                });
            }
            Screening::Ignore(reason) => self.shared.count_stranger(reason, remote),
            // Not asked for a validated address.
            Screening::Retry => {}
        }
    }
}

/// Closes the connection of every admitted centre whose certificate the CRL now revokes, within a poll of the
/// CRL changing (new handshakes are refused by the verifier itself).
fn close_revoked(shared: &Shared) {
    let peers: Vec<(CenterId, Link)> = lock(&shared.peers)
        .iter()
        .map(|(c, p)| (c.clone(), p.connection.clone()))
        .collect();
    for (center, connection) in peers {
        let chain = connection.peer_chain();
        if chain.is_empty() || !shared.verifier.revoked(&chain) {
            continue;
        }
        let serial = chain
            .first()
            .and_then(|c| serial_of(c).ok())
            .unwrap_or_default();
        connection.close(close::REVOKED, b"this centre's certificate was revoked");
        shared.emit(ServerEvent::Revoked {
            center,
            remote: connection.remote_address(),
            serial,
        });
    }
}

/// A TCP listener on `addr` for tokio (TLS over TCP's, or the metrics').
fn listen_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The next connection to an optional listener (TLS over TCP's, the metrics'); never, without one.
async fn accept_on(
    listener: Option<&tokio::net::TcpListener>,
) -> Option<std::io::Result<(tokio::net::TcpStream, SocketAddr)>> {
    match listener {
        Some(l) => Some(l.accept().await),
        None => std::future::pending().await,
    }
}

/// The run's end to every connected centre, and to any that joins later.
fn tell_finish(shared: &Shared, finish: Finish) {
    *lock(&shared.finished) = Some(finish.clone());
    let peers: Vec<(CenterId, mpsc::Sender<Finish>)> = lock(&shared.peers)
        .iter()
        .map(|(c, p)| (c.clone(), p.finish.clone()))
        .collect();
    for (center, p) in peers {
        if p.try_send(finish.clone()).is_ok() {
            lock(&shared.told).insert(center);
        }
    }
    shared.peers_changed();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not stop the server from serving the other centres.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
