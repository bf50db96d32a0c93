//! The test federation: a PKI in a temporary folder and a real server on loopback QUIC.

pub mod process;

pub use fedslm_transport::Transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedslm_certs::{IssueOptions, Pki};
use fedslm_client::{connect, ClientConfig};
use fedslm_protocol::{CenterId, ErrorCode, SampleCounts};
use fedslm_server::{Server, ServerConfig, ServerEvent};
use tokio::sync::broadcast;

/// A folder of `shared/reference` (the values R, scikit-learn, statsmodels, dcurves, pydicom and nibabel
/// computed), located as every crate's tests locate it: `FEDSLM_REFERENCE`, set in .cargo/config.toml.
pub fn reference(sub: &str) -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE")).join(sub)
}

/// Runs the `fedslm` binary in the current folder; returns (success, stdout, stderr).
pub fn fedslm(args: &[&str]) -> (bool, String, String) {
    fedslm_in(Path::new("."), args)
}

/// Runs the `fedslm` binary in `dir`; returns (success, stdout, stderr).
pub fn fedslm_in(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedslm"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run fedslm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tiny synthetic cohort's centres and their roles.
pub const TINY_CENTRES: [(&str, &str); 4] = [
    ("center-a", "train"),
    ("center-b", "train"),
    ("center-c", "train"),
    ("external", "validate"),
];

/// `fedslm model init --model MODEL --out OUT` with `extra` arguments (a client.toml, a seed).
pub fn init_model(model: &str, out: &Path, extra: &[&str]) {
    let out = out.display().to_string();
    let mut args = vec!["model", "init", "--model", model, "--out", out.as_str()];
    args.extend_from_slice(extra);
    let (ok, _, err) = fedslm(&args);
    assert!(ok, "{err}");
}

/// The clinical model file at `path` holds statsmodels' pooled fit of the reference centres: coefficients
/// within 1e-6, standard errors (in its card's odds-ratio table) within 1e-5.
pub fn assert_pooled_statsmodels_fit(path: &Path) {
    let reference = reference("clinical");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference.join("expected_pooled_logit.json")).unwrap(),
    )
    .unwrap();
    let (weights, card) = fedslm_model::load(path).unwrap();
    let table = card.clinical.expect("the odds-ratio table");
    let coefficients = fedslm_model::clinical::coefficients(&weights).unwrap();
    for (i, name) in fedslm_model::clinical::names().iter().enumerate() {
        let want = expected["coefficients"][name].as_f64().unwrap();
        assert!(
            (coefficients[i] - want).abs() < 1e-6,
            "{name}: {} vs statsmodels {want}",
            coefficients[i]
        );
        let se = expected["std_errors"][name].as_f64().unwrap();
        let got = table.coefficients[*name]["std_error"].as_f64().unwrap();
        assert!((got - se).abs() < 1e-5, "{name} SE: {got} vs {se}");
    }
}

/// The `tiny` synthetic cohort (seed 3) written to `dir/cohort` by the binary.
pub fn tiny_synth_cohort(dir: &Path) -> PathBuf {
    let cohort = dir.join("cohort");
    let (ok, _, err) = fedslm(&[
        "synth",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--out",
        &cohort.display().to_string(),
    ]);
    assert!(ok, "{err}");
    cohort
}

pub struct Federation {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub server: Arc<Server>,
    pub events: broadcast::Receiver<ServerEvent>,
    pub addr: std::net::SocketAddr,
    /// The transport its nodes are configured to use.
    pub transport: Transport,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The text field `key` of each object in the JSON array `list` (the centres of a list of records, say).
pub fn field_strs<'a>(list: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v[key].as_str().unwrap())
        .collect()
}

pub fn id(s: &str) -> CenterId {
    CenterId::new(s).unwrap()
}

impl Federation {
    pub async fn start(extra: &str) -> Federation {
        Federation::start_over(Transport::Quic, extra).await
    }

    /// A federation whose nodes use `transport`.
    pub async fn start_over(transport: Transport, extra: &str) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(
            &dir.path().join("pki"),
            "test",
            "localhost",
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        Federation::serve(dir, extra, transport).await
    }

    /// Another server on the PKI folder of `fed`, in a folder of its own that links to it.
    pub async fn restart(fed: &Federation) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(fed.dir.path().join("pki"), dir.path().join("pki")).unwrap();
        Federation::serve(dir, "", fed.transport).await
    }

    async fn serve(dir: tempfile::TempDir, extra: &str, transport: Transport) -> Federation {
        let pki = Pki::open(&dir.path().join("pki")).unwrap();
        let toml = format!(
            r#"
            listen = "127.0.0.1:0"
            pki = "pki"
            run_id = "run-7"
            rounds = 3
            hello_timeout_secs = 2
            {extra}
            [[center]]
            id = "center-a"
            role = "train"
            [[center]]
            id = "center-b"
            role = "train"
            [[center]]
            id = "external"
            role = "validate"
            "#
        );
        let config = ServerConfig::parse(&toml, &dir.path().join("server.toml")).unwrap();
        let server = Arc::new(Server::bind(config).unwrap());
        let addr = server.local_addr().unwrap();
        let events = server.subscribe();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        tokio::spawn(async move {
            s.run(async {
                let _ = stopped.await;
            })
            .await
        });
        Federation {
            dir,
            pki,
            server,
            events,
            addr,
            transport,
            _stop: stop,
        }
    }

    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a certificate for `center` and returns a client configuration that uses it.
    pub fn node(&self, center: &str) -> ClientConfig {
        self.node_with(center, IssueOptions::days(30).unwrap())
    }

    pub fn node_with(&self, center: &str, options: IssueOptions) -> ClientConfig {
        let out = self.node_dir(center);
        self.pki.issue(&id(center), &out, options).unwrap();
        self.config_for(center, center, &out)
    }

    /// A client configuration claiming `claimed`, with the files of `cert_center` in `dir`.
    pub fn config_for(&self, claimed: &str, cert_center: &str, dir: &Path) -> ClientConfig {
        let toml = format!(
            r#"
            center = "{claimed}"
            server = "{}"
            server_name = "localhost"
            ca = "{}"
            cert = "{}"
            key = "{}"
            {}
            "#,
            self.addr,
            dir.join("ca.pem").display(),
            dir.join(format!("{cert_center}.pem")).display(),
            dir.join(format!("{cert_center}.key")).display(),
            self.route(),
        );
        ClientConfig::parse(&toml, &dir.join("client.toml")).unwrap()
    }

    /// client.toml's keys for the federation's transport: QUIC alone, or TLS over TCP to the server's
    /// listener.
    pub fn route(&self) -> String {
        match self.transport {
            Transport::Quic => "transport = \"quic\"".into(),
            Transport::Tcp => format!(
                "transport = \"tcp\"\n            tcp_server = \"{}\"",
                self.server.tcp_addr().expect("the server listens on TCP")
            ),
        }
    }

    /// The next server event that `want` accepts, skipping others, or a panic after 10 s.
    pub async fn expect(&mut self, want: impl Fn(&ServerEvent) -> bool) -> ServerEvent {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let e = self.events.recv().await.unwrap();
                if want(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("no such server event within 10 s")
    }

    pub async fn expect_admitted(&mut self, center: &str) {
        let c = id(center);
        self.expect(|e| matches!(e, ServerEvent::Admitted { center, .. } if *center == c))
            .await;
    }

    pub async fn expect_handshake_failure(&mut self) -> (Option<u8>, String) {
        match self
            .expect(|e| matches!(e, ServerEvent::HandshakeFailed { .. }))
            .await
        {
            ServerEvent::HandshakeFailed { alert, reason, .. } => (alert, reason),
            _ => unreachable!(),
        }
    }

    pub async fn expect_refusal(&mut self) -> (CenterId, ErrorCode, String) {
        match self
            .expect(|e| matches!(e, ServerEvent::Refused { .. }))
            .await
        {
            ServerEvent::Refused {
                center,
                code,
                reason,
                ..
            } => (center, code, reason),
            _ => unreachable!(),
        }
    }

    /// Positive control: a valid, enrolled centre is admitted by this same server.
    pub async fn control(&mut self, center: &str) {
        let config = if self.node_dir(center).join(format!("{center}.pem")).exists() {
            self.config_for(center, center, &self.node_dir(center))
        } else {
            self.node(center)
        };
        let session = connect(&config, SampleCounts::default())
            .await
            .expect("positive control refused");
        assert_eq!(session.welcome.center, id(center));
        self.expect_admitted(center).await;
        session.close(0, "control done").await;
    }
}
