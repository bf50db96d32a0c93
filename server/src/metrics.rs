//! The server's metrics, in the Prometheus (OpenMetrics) text format through the Prometheus project's own
//! client crate, and the small HTTP endpoint that serves them on `metrics_listen` (a local address: the
//! metrics name centres and their refusals). Updated where the endpoint and the driver see things happen;
//! what only a connection knows (bytes, centres connected) is read when scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Label sets: a few short names, each from a bounded set (never a peer's text).
type Labels = Vec<(&'static str, String)>;

/// The largest HTTP request head the metrics endpoint reads, and how long it waits for it.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// Everything the server counts.
pub struct Metrics {
    registry: Registry,
    rounds_committed: Counter,
    round_seconds: Histogram,
    commit_seconds: Histogram,
    centers_connected: Family<Labels, Gauge>,
    received_bytes: Counter,
    sent_bytes: Counter,
    /// Bytes of connections that have closed, added to the live ones' when scraped.
    closed_received: AtomicU64,
    closed_sent: AtomicU64,
    refusals: Family<Labels, Counter>,
    handshakes_failed: Family<Labels, Counter>,
    evaluation_auc: Family<Labels, Gauge<f64, AtomicU64>>,
    evaluation_round: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fedslm");
        let m = Metrics {
            rounds_committed: Counter::default(),
            // 10 ms to about 45 minutes.
            round_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            centers_connected: Family::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            closed_received: AtomicU64::new(0),
            closed_sent: AtomicU64::new(0),
            refusals: Family::default(),
            handshakes_failed: Family::default(),
            evaluation_auc: Family::default(),
            evaluation_round: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rounds_committed",
            "Rounds committed to the store",
            m.rounds_committed.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Time from a round's tasks to its commit",
            m.round_seconds.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time to make a round durable (checkpoint, record, signed head)",
            m.commit_seconds.clone(),
        );
        registry.register(
            "centers_connected",
            "Admitted centres connected now, by transport",
            m.centers_connected.clone(),
        );
        registry.register(
            "received_bytes",
            "UDP payload bytes received from admitted centres",
            m.received_bytes.clone(),
        );
        registry.register(
            "sent_bytes",
            "UDP payload bytes sent to admitted centres",
            m.sent_bytes.clone(),
        );
        registry.register(
            "refusals",
            "Refusals by kind (admission, update) and reason",
            m.refusals.clone(),
        );
        registry.register(
            "handshakes_failed",
            "Failed or ignored handshakes by reason",
            m.handshakes_failed.clone(),
        );
        registry.register(
            "evaluation_auc",
            "Pooled AUC of the last evaluation, by side (internal, external)",
            m.evaluation_auc.clone(),
        );
        registry.register(
            "evaluation_round",
            "The round of the last evaluation",
            m.evaluation_round.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn round_committed(&self, duration: Duration) {
        self.rounds_committed.inc();
        self.round_seconds.observe(duration.as_secs_f64());
    }

    pub fn commit_took(&self, duration: Duration) {
        self.commit_seconds.observe(duration.as_secs_f64());
    }

    /// A refusal of `kind` (`admission`, `update`) for `reason`, a short name from a fixed set.
    pub fn refused(&self, kind: &'static str, reason: &str) {
        self.refusals
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// A failed or ignored handshake, by a reason from a bounded set (a TLS alert's name, `timeout`, `limit`,
    /// `other`).
    pub fn handshake_failed(&self, reason: &str) {
        self.handshakes_failed
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// The last evaluation's pooled AUCs (a side with none is left as it was).
    pub fn evaluated(&self, round: u32, internal: Option<f64>, external: Option<f64>) {
        self.evaluation_round.set(i64::from(round));
        for (side, auc) in [("internal", internal), ("external", external)] {
            if let Some(auc) = auc {
                self.evaluation_auc
                    .get_or_create(&vec![("side", side.to_string())])
                    .set(auc);
            }
        }
    }

    /// A connection's bytes, added when it closes.
    pub fn connection_closed(&self, received: u64, sent: u64) {
        self.closed_received.fetch_add(received, Ordering::Relaxed);
        self.closed_sent.fetch_add(sent, Ordering::Relaxed);
    }

    /// The text a scrape gets, with the live connections' figures (centres connected by transport, and the
    /// bytes they have received and sent so far).
    pub fn encode(
        &self,
        connected: &[(fedslm_transport::Transport, i64)],
        live_received: u64,
        live_sent: u64,
    ) -> String {
        for (transport, n) in connected {
            self.centers_connected
                .get_or_create(&vec![("transport", transport.name().to_string())])
                .set(*n);
        }
        for (counter, closed, live) in [
            (&self.received_bytes, &self.closed_received, live_received),
            (&self.sent_bytes, &self.closed_sent, live_sent),
        ] {
            let total = closed.load(Ordering::Relaxed) + live;
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// One HTTP exchange on the metrics endpoint: `GET /metrics` gets `body()`, anything else a 404; a request
/// head larger than 8 KiB or slower than 5 s gets nothing.
pub async fn answer(mut stream: tokio::net::TcpStream, body: impl FnOnce() -> String) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_WITHIN, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    })
    .await;
    if !matches!(read, Ok(Some(()))) {
        return;
    }
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = first.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let response = if method == Some(b"GET") && path == Some(b"/metrics") {
        let body = body();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_holds_every_family_with_its_values() {
        let m = Metrics::new();
        m.round_committed(Duration::from_millis(1500));
        m.round_committed(Duration::from_millis(500));
        m.refused("update", "norm");
        m.handshake_failed("CertificateRequired");
        m.evaluated(2, Some(0.75), None);
        m.connection_closed(100, 10);
        let text = m.encode(&[(fedslm_transport::Transport::Quic, 3)], 50, 5);
        for line in [
            "fedslm_rounds_committed_total 2",
            "fedslm_round_duration_seconds_sum 2.0",
            "fedslm_round_duration_seconds_count 2",
            "fedslm_centers_connected{transport=\"quic\"} 3",
            "fedslm_received_bytes_total 150",
            "fedslm_sent_bytes_total 15",
            "fedslm_refusals_total{kind=\"update\",reason=\"norm\"} 1",
            "fedslm_handshakes_failed_total{reason=\"CertificateRequired\"} 1",
            "fedslm_evaluation_auc{side=\"internal\"} 0.75",
            "fedslm_evaluation_round 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // The live connection closes: its bytes move from live to closed, and the total stays.
        m.connection_closed(50, 5);
        let text = m.encode(&[(fedslm_transport::Transport::Tcp, 2)], 0, 0);
        assert!(text.contains("fedslm_received_bytes_total 150"), "{text}");
        assert!(
            text.contains("fedslm_centers_connected{transport=\"tcp\"} 2"),
            "{text}"
        );
    }
}
