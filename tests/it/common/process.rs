//! A federation of `fedslm` processes on loopback: a PKI, a server configuration, client configurations, and
//! processes whose output is collected as it comes (so that a test can wait for a line, then kill).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedslm_certs::{IssueOptions, Pki};

use super::id;

/// The longest any process of a test may run.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// A free UDP port for a test's server process, below the kernel's ephemeral range: a server that is killed
/// and started again on its port must find it free, and a port the kernel hands out for port 0 (every other
/// socket of the suite binds port 0) could be taken by another test in between.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let base = 10_000;
    let span = ephemeral.saturating_sub(base).max(1_000);
    // Apart per process (test binaries may run side by side) and per call.
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = base + (start + n.wrapping_mul(13)) % span;
        if std::net::UdpSocket::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

pub struct Run {
    pub dir: PathBuf,
    pub port: u16,
    pub run_id: String,
}

impl Run {
    /// A PKI with a certificate for each centre, and the server's configuration (output in `out`).
    pub fn new(dir: &Path, centers: &[(&str, &str)], round_keys: &str) -> Run {
        Run::with_id(dir, "e2e", centers, round_keys)
    }

    /// [`Run::new`] with the run id `run_id`.
    pub fn with_id(dir: &Path, run_id: &str, centers: &[(&str, &str)], round_keys: &str) -> Run {
        let pki = Pki::init(
            &dir.join("pki"),
            "test",
            "localhost",
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        let port = free_udp_port();
        let run = Run {
            dir: dir.to_path_buf(),
            port,
            run_id: run_id.to_string(),
        };
        for (c, _) in centers {
            pki.issue(&id(c), &dir.join(c), IssueOptions::days(30).unwrap())
                .unwrap();
        }
        run.write_server_config(centers, round_keys);
        run
    }

    /// (Re)writes `server.toml`.
    pub fn write_server_config(&self, centers: &[(&str, &str)], round_keys: &str) {
        let mut toml = format!(
            "listen = \"127.0.0.1:{}\"\npki = \"pki\"\nrun_id = \"{}\"\noutput = \"out\"\n{round_keys}\n",
            self.port, self.run_id
        );
        for (c, role) in centers {
            toml.push_str(&format!("[[center]]\nid = \"{c}\"\nrole = \"{role}\"\n"));
        }
        std::fs::write(self.dir.join("server.toml"), toml).unwrap();
    }

    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// `client.toml` of `centre` with its cohort folder and extra settings.
    pub fn client_config(&self, center: &str, cohort: &Path, extra: &str) -> PathBuf {
        let server = format!("127.0.0.1:{}", self.port);
        self.client_config_to(center, cohort, &server, extra)
    }

    /// [`Run::client_config`] with the server at `server` (`host:port`).
    pub fn client_config_to(
        &self,
        center: &str,
        cohort: &Path,
        server: &str,
        extra: &str,
    ) -> PathBuf {
        let d = self.dir.join(center);
        let path = d.join("client.toml");
        std::fs::write(
            &path,
            format!(
                "center = \"{center}\"\nserver = \"{server}\"\nserver_name = \"localhost\"\n\
                 ca = \"ca.pem\"\ncert = \"{center}.pem\"\nkey = \"{center}.key\"\n\
                 cohort = \"{}\"\nrecord = \"sent\"\nthreads = 1\n{extra}",
                cohort.display()
            ),
        )
        .unwrap();
        path
    }

    /// Starts `fedslm server` with `args` after the configuration and `env`; returns once it listens (or has
    /// exited).
    pub fn server(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedslm"));
        cmd.args(["server", "--config"])
            .arg(self.dir.join("server.toml"))
            .args(args)
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let p = Proc::spawn(cmd);
        p.wait_for(
            |out, _| out.contains("listening on"),
            Duration::from_secs(30),
        );
        p
    }

    /// Starts a client that tries `attempts` times to reach the server.
    pub fn client(&self, config: &Path, attempts: u32) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedslm"));
        cmd.args([
            "client",
            "--max-attempts",
            &attempts.to_string(),
            "--config",
        ])
        .arg(config)
        .env("RUST_LOG", "warn");
        Proc::spawn(cmd)
    }

    /// Starts the server, waits until it listens, starts the clients and waits for everyone to finish.
    /// Returns the server's stdout and each client's output.
    pub fn go(&self, clients: &[PathBuf]) -> (String, Vec<String>) {
        self.go_with(&[], clients)
    }

    /// [`Run::go`] with further arguments for the server.
    pub fn go_with(&self, server_args: &[&str], clients: &[PathBuf]) -> (String, Vec<String>) {
        let server = self.server(server_args, &[]);
        let children: Vec<Proc> = clients.iter().map(|c| self.client(c, 5)).collect();
        let outputs: Vec<String> = children
            .into_iter()
            .map(|c| {
                let (ok, out, err) = c.wait();
                assert!(ok, "client failed:\n{out}{err}");
                format!("{out}{err}")
            })
            .collect();
        let (ok, out, err) = server.wait();
        assert!(
            ok,
            "server failed:\n{out}\n{err}\nclients:\n{}",
            outputs.join("\n---\n")
        );
        (out, outputs)
    }
}

/// A child process whose stdout and stderr are read as they come.
pub struct Proc {
    child: Child,
    started: Instant,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    })
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start fedslm");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Proc {
            child,
            started: Instant::now(),
            stdout,
            stderr,
            readers,
        }
    }

    pub fn output(&self) -> (String, String) {
        (
            self.stdout.lock().unwrap().clone(),
            self.stderr.lock().unwrap().clone(),
        )
    }

    /// Waits until `want(stdout, stderr)` holds, or the process exits, or `limit` passes (a panic).
    pub fn wait_for(&self, want: impl Fn(&str, &str) -> bool, limit: Duration) {
        let start = Instant::now();
        loop {
            let (out, err) = self.output();
            if want(&out, &err) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "not seen within {limit:?}:\n{out}\n{err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(mut self) -> (String, String) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.output()
    }

    /// Waits for the process to exit (killing it after [`RUN_LIMIT`]); (success, stdout, stderr).
    pub fn wait(mut self) -> (bool, String, String) {
        let ok = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.success();
            }
            if self.started.elapsed() > RUN_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                let (out, err) = self.output();
                return (
                    false,
                    out,
                    format!("{err}\n(ran past {RUN_LIMIT:?} and was killed)"),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let (out, err) = self.output();
        (ok, out, err)
    }
}

/// Two FedProx rounds of the MRI network (seed 5) on the tiny cohort at `cohort`, in `d`, with `extra` keys in
/// server.toml: the finished run's server output and each client's.
pub fn tiny_fedprox_run(d: &Path, cohort: &Path, extra: &str) -> (String, Vec<String>) {
    let centers = super::TINY_CENTRES;
    let run = Run::new(
        d,
        &centers,
        &format!(
            "initial_model = \"init.safetensors\"\nrounds = 2\nlocal_epochs = 1\nbatch_size = 4\n\
             strategy = \"fedprox\"\nproximal_mu = 0.01\n{extra}"
        ),
    );
    let preprocess = "[preprocess]\nsize = 32\nneighbours = 0\n";
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|(c, _)| run.client_config(c, &cohort.join(c), preprocess))
        .collect();
    super::init_model(
        "mri",
        &d.join("init.safetensors"),
        &["--config", &clients[0].display().to_string(), "--seed", "5"],
    );
    let (server_out, outs) = run.go(&clients);
    assert!(
        server_out.contains("run completed after 2 rounds"),
        "{server_out}"
    );
    (server_out, outs)
}
