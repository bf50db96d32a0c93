//! The load benchmark of what strangers cost the server (`fedslm bench flood`): a real server process runs
//! FedAvg rounds of a tiny network for echoing nodes in this process while a stranger
//! ([`super::stranger`]) floods it phase by phase; the server's resident memory is sampled every 20 ms, and
//! the rounds it commits in each phase are counted.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedslm_client::Backoff;
use fedslm_model::{save, ModelKind, NetConfig, Network};

use super::stranger::{Answers, Stranger};
use super::{round_times, Echo, ServerProcess, ECHO_PATIENTS};
use crate::StudyError;

/// How much of each kind of stranger the benchmark sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodSpec {
    /// Initials from an address that answers nothing (as spoofed ones would).
    pub initials: usize,
    /// Connections from one address that answer their Retry, then stop (half-open, validated).
    pub validated: usize,
    /// Whole handshakes without a certificate, one after the other.
    pub hostile: usize,
    /// Honest training centres.
    pub centres: usize,
}

/// One phase of the benchmark, as the server lived it.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_mib: f64,
    /// Rounds the honest centres completed in the phase.
    pub rounds: usize,
    /// What the server answered, where the phase counts it.
    pub answers: Option<Answers>,
}

/// Samples a process's resident memory until dropped, keeping the peak since the last reset.
struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let kib = rss_kib(pid);
                    peak.fetch_max(kib, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Sampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak since the last call, in MiB; the next peak starts from now.
    fn take_peak(&self, pid: u32) -> f64 {
        let kib = self.peak.swap(rss_kib(pid), Ordering::Relaxed);
        kib as f64 / 1024.0
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the benchmark against `server_program` (the `fedslm` binary) in the scratch folder `dir`; returns
/// its phases in order: quiet, the flood of Initials, validated half-open handshakes, hostile handshakes in
/// sequence (twice: the first tenth, then the rest, so that growth per connection shows), quiet again.
pub fn flood(
    server_program: &Path,
    dir: &Path,
    spec: FloodSpec,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Phase>, StudyError> {
    // Rounds without end, cheap to store: a network of a few thousand parameters.
    let init = dir.join("init.safetensors");
    let config = NetConfig {
        width: 4,
        ..NetConfig::compact(1, 16, 0)
    };
    let network = Network::new(ModelKind::Mri, config, 1)?;
    save(
        &init,
        &network.to_weights()?,
        &network.card(Default::default(), Default::default()),
    )?;
    let server = ServerProcess::start(server_program, dir, &init, spec.centres, |s| {
        s.rounds = 1_000_000;
        s.evaluation_bins = 0;
    })?;
    let pid = server.process.id();
    let runtime = crate::error::runtime()?;
    for config in server.nodes.clone() {
        runtime.spawn(async move {
            let backoff = Backoff {
                attempts: Some(3),
                ..Backoff::default()
            };
            // A node spends a little time on each round, as training would.
            let echo = Echo {
                pace: Duration::from_millis(100),
            };
            fedslm_client::run(&config, ECHO_PATIENTS, echo, backoff, |_| {}).await
        });
    }
    let sampler = Sampler::start(pid);
    let mut stranger = Stranger::new(server.addr, &server.pki.join("ca.pem"))?;
    let mut phases = Vec::new();
    let mut phase = |name: &str,
                     work: &mut dyn FnMut(&mut Stranger) -> Result<Option<Answers>, StudyError>|
     -> Result<(), StudyError> {
        progress(name);
        let before = round_times(dir)?.len();
        sampler.take_peak(pid);
        let rss_before_mib = rss_kib(pid) as f64 / 1024.0;
        let started = Instant::now();
        let answers = work(&mut stranger)?;
        let seconds = started.elapsed().as_secs_f64();
        phases.push(Phase {
            name: name.to_string(),
            seconds,
            rss_before_mib,
            rss_peak_mib: sampler.take_peak(pid),
            rss_after_mib: rss_kib(pid) as f64 / 1024.0,
            rounds: round_times(dir)?.len().saturating_sub(before),
            answers,
        });
        Ok(())
    };
    // The centres join and the rounds begin.
    std::thread::sleep(Duration::from_secs(3));
    phase("quiet (honest rounds only)", &mut |_| {
        std::thread::sleep(Duration::from_secs(3));
        Ok(None)
    })?;
    phase(
        &format!(
            "{} Initials from addresses that never answer",
            spec.initials
        ),
        &mut |s| {
            s.initials(spec.initials)?;
            Ok(Some(s.listen(Duration::from_secs(2))?))
        },
    )?;
    phase(
        &format!(
            "{} validated half-open handshakes from one address",
            spec.validated
        ),
        &mut |s| {
            s.validated(spec.validated)?;
            Ok(Some(s.listen(Duration::from_secs(3))?))
        },
    )?;
    let hostile = Hostile::new(&runtime, &server.pki.join("ca.pem"), server.addr)?;
    let first = spec.hostile / 10;
    phase(
        &format!("{first} handshakes without a certificate, in sequence"),
        &mut |_| {
            let refused = hostile.run(&runtime, first);
            Ok(Some(Answers {
                refused,
                ..Answers::default()
            }))
        },
    )?;
    phase(
        &format!(
            "{} more handshakes without a certificate, in sequence",
            spec.hostile - first
        ),
        &mut |_| {
            let refused = hostile.run(&runtime, spec.hostile - first);
            Ok(Some(Answers {
                refused,
                ..Answers::default()
            }))
        },
    )?;
    phase("quiet again", &mut |_| {
        std::thread::sleep(Duration::from_secs(3));
        Ok(None)
    })?;
    drop(sampler);
    let mut process = server.process;
    let _ = process.kill();
    let _ = process.wait();
    runtime.shutdown_background();
    Ok(phases)
}

/// Whole handshakes without a client certificate, which the server refuses (certificate required).
struct Hostile {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server: std::net::SocketAddr,
}

impl Hostile {
    fn new(
        runtime: &tokio::runtime::Runtime,
        ca: &Path,
        server: std::net::SocketAddr,
    ) -> Result<Hostile, StudyError> {
        let tls = fedslm_certs::stranger_client_config(ca)?;
        let config = fedslm_certs::quic_client_config(tls)?;
        let _guard = runtime.enter();
        let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| StudyError::Failed(format!("cannot bind a client endpoint: {e}")))?;
        Ok(Hostile {
            endpoint,
            config,
            server,
        })
    }

    /// `n` handshakes, one after the other, each to its refusal; returns how many the server refused for
    /// want of a certificate (the others failed otherwise, or timed out).
    fn run(&self, runtime: &tokio::runtime::Runtime, n: usize) -> usize {
        const CERTIFICATE_REQUIRED: u8 = 116;
        runtime.block_on(async {
            let mut refused = 0;
            for _ in 0..n {
                let Ok(connecting) =
                    self.endpoint
                        .connect_with(self.config.clone(), self.server, "localhost")
                else {
                    continue;
                };
                // TLS 1.3: the client's side may complete before the server refuses the missing certificate.
                let error = match tokio::time::timeout(Duration::from_secs(15), connecting).await {
                    Ok(Ok(connection)) => {
                        tokio::time::timeout(Duration::from_secs(5), connection.closed())
                            .await
                            .ok()
                    }
                    Ok(Err(e)) => Some(e),
                    Err(_) => None,
                };
                if error.is_some_and(|e| fedslm_certs::tls_alert(&e) == Some(CERTIFICATE_REQUIRED))
                {
                    refused += 1;
                }
            }
            refused
        })
    }
}
