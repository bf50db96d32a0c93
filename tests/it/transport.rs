//! The TCP path through a hospital network: QUIC's UDP dropped on the way, one centre reaching the server over
//! TLS on TCP directly and one through a real HTTP proxy (tinyproxy, with basic authentication), the run equal
//! to the QUIC run byte for byte; and a TLS-inspecting middlebox named by `--check` and refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::fedslm;
use crate::common::process::Run;
use fedslm_server::Store;

fn reference(center: &str) -> PathBuf {
    crate::common::reference("clinical").join(center)
}

/// tinyproxy from Debian's package, on a free loopback port, until dropped.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    /// With `BasicAuth user password`.
    fn start(dir: &Path, user: &str, password: &str) -> Tinyproxy {
        let program = which("tinyproxy").expect(
            "tinyproxy is needed for the proxy tests: `apt-get install tinyproxy` (.ci/run installs it)",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("tinyproxy.conf");
        let log = dir.join("tinyproxy.log");
        // No ConnectPort line: CONNECT to any port (a hospital proxy would list the server's).
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 20\nLogLevel Connect\n\
                 LogFile \"{}\"\nBasicAuth {user} {password}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new(program)
            .args(["-d", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start tinyproxy");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tinyproxy did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tinyproxy { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

const CENTERS: [&str; 2] = ["center-a", "center-b"];
const KEYS: &str = "initial_model = \"init.safetensors\"\nrounds = 30\n";

/// The committed rounds' checkpoint hashes (each round's model file, named by its SHA-256) and the final
/// model's tensors. The final file's card differs with the audit log's head, which records the transports.
fn outcome(run: &Run) -> (Vec<String>, fedslm_protocol::Weights) {
    let rounds = Store::open_existing(&run.out()).unwrap().rounds().unwrap();
    let hashes = rounds.iter().map(|r| r.checkpoint.clone()).collect();
    let (model, _) = fedslm_model::load(&run.out().join("clinical.safetensors")).unwrap();
    (hashes, model)
}

/// The transports of the audit log's `center_joined` entries.
fn joined_over(run: &Run) -> Vec<(String, String)> {
    let store = Store::open_existing(&run.out()).unwrap();
    store
        .audit_entries()
        .unwrap()
        .iter()
        .filter_map(|(_, bytes)| {
            let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            (v["event"] == "center_joined").then(|| {
                (
                    v["center"].as_str().unwrap().to_string(),
                    v["transport"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn with_udp_dropped_one_centre_direct_and_one_through_a_real_proxy_end_as_the_quic_run() {
    let tmp = tempfile::tempdir().unwrap();
    let train = CENTERS.map(|c| (c, "train"));

    // The QUIC run.
    let quic = Run::new(&tmp.path().join("quic"), &train, KEYS);
    crate::common::init_model("clinical", &quic.dir.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = CENTERS
        .iter()
        .map(|c| quic.client_config(c, &reference(c), "transport = \"quic\"\n"))
        .collect();
    let (out, _) = quic.go(&clients);
    assert!(out.contains("run completed after"), "{out}");

    // The same run where UDP to the server's port is dropped on the way (a socket that never answers holds
    // it, as a firewall's DROP rule would) and TCP on that port reaches the server.
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let tcp = Run::new(
        &tmp.path().join("tcp"),
        &train,
        &format!("{KEYS}tcp_listen = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::copy(
        quic.dir.join("init.safetensors"),
        tcp.dir.join("init.safetensors"),
    )
    .unwrap();
    let proxy = Tinyproxy::start(tmp.path(), "node7", "s3cret");
    std::fs::write(tcp.dir.join("center-b/proxy.credentials"), "node7:s3cret\n").unwrap();
    let server = format!("127.0.0.1:{port}");
    let clients = vec![
        tcp.client_config_to("center-a", &reference("center-a"), &server, "quic_fallback_secs = 1\n"),
        tcp.client_config_to(
            "center-b",
            &reference("center-b"),
            &server,
            &format!(
                "quic_fallback_secs = 1\nproxy = \"http://127.0.0.1:{}\"\nproxy_credentials = \"proxy.credentials\"\n",
                proxy.port
            ),
        ),
    ];
    let (out, client_outs) = tcp.go(&clients);
    assert!(out.contains("run completed after"), "{out}");
    drop(hole);

    assert_eq!(
        outcome(&tcp),
        outcome(&quic),
        "the TCP run ends as the QUIC run, byte for byte"
    );
    let joined = joined_over(&tcp);
    assert!(!joined.is_empty());
    assert!(joined.iter().all(|(_, t)| t == "tcp"), "{joined:?}");
    assert!(joined_over(&quic).iter().all(|(_, t)| t == "quic"));
    // `server status` says so too.
    let (ok, status, err) = fedslm(&[
        "server",
        "status",
        "--out",
        &tcp.out().display().to_string(),
    ]);
    assert!(ok, "{err}");
    for c in CENTERS {
        let line = status
            .lines()
            .find(|l| l.trim_start().starts_with(c))
            .unwrap();
        assert!(line.contains(" tcp "), "{status}");
    }
    // Centre b's connections went through the proxy, centre a's did not.
    let log = proxy.log();
    assert!(
        log.contains(&format!("127.0.0.1:{port}")),
        "tinyproxy's log:\n{log}"
    );
    for out in &client_outs {
        assert!(out.contains("finished after"), "{out}");
    }
}

#[test]
fn a_proxy_that_wants_other_credentials_is_named_by_check_with_its_status_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(tmp.path(), &[("center-a", "train")], KEYS);
    crate::common::init_model("clinical", &run.dir.join("init.safetensors"), &[]);
    let proxy = Tinyproxy::start(tmp.path(), "node7", "s3cret");
    std::fs::write(
        tmp.path().join("center-a/proxy.credentials"),
        "node7:wrong\n",
    )
    .unwrap();
    let config = run.client_config(
        "center-a",
        &reference("center-a"),
        &format!(
            "transport = \"tcp\"\nproxy = \"http://127.0.0.1:{}\"\nproxy_credentials = \"proxy.credentials\"\n",
            proxy.port
        ),
    );
    let server = run.server(&[], &[]);
    let (ok, out, err) = fedslm(&[
        "client",
        "--config",
        &config.display().to_string(),
        "--check",
    ]);
    drop(server);
    assert!(!ok, "{out}");
    // The proxy's own status line, and the fix.
    assert!(err.contains("HTTP/1.0 401 Unauthorized"), "{err}");
    assert!(
        err.contains("\nproxy: the proxy asks for credentials"),
        "{err}"
    );
    assert!(err.contains("proxy_credentials"), "{err}");
    assert!(out.contains("through the proxy"), "{out}");
}
