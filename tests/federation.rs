//! Whole runs of the `fedslm` binary over loopback QUIC with mutual TLS: a server process and one client
//! process per centre, each with its own certificate.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fedslm, id};
use fedslm_certs::{IssueOptions, Pki};
use serde_json::Value;

const RUN_LIMIT: Duration = Duration::from_secs(300);

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

struct Run {
    dir: PathBuf,
    port: u16,
}

impl Run {
    /// A PKI with a certificate for each centre, and the server's configuration.
    fn new(dir: &Path, centres: &[(&str, &str)], round_keys: &str) -> Run {
        let pki = Pki::init(
            &dir.join("pki"),
            "test",
            "localhost",
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        let port = free_udp_port();
        let mut toml = format!(
            "listen = \"127.0.0.1:{port}\"\npki = \"pki\"\nrun_id = \"e2e\"\noutput = \"out\"\n{round_keys}\n"
        );
        for (c, role) in centres {
            pki.issue(&id(c), &dir.join(c), IssueOptions::days(30).unwrap())
                .unwrap();
            toml.push_str(&format!("[[center]]\nid = \"{c}\"\nrole = \"{role}\"\n"));
        }
        std::fs::write(dir.join("server.toml"), toml).unwrap();
        Run {
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// `client.toml` of `centre` with its cohort folder and extra settings.
    fn client_config(&self, centre: &str, cohort: &Path, extra: &str) -> PathBuf {
        let d = self.dir.join(centre);
        let path = d.join("client.toml");
        std::fs::write(
            &path,
            format!(
                "center = \"{centre}\"\nserver = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n\
                 ca = \"ca.pem\"\ncert = \"{centre}.pem\"\nkey = \"{centre}.key\"\n\
                 cohort = \"{}\"\nrecord = \"sent\"\nthreads = 1\n{extra}",
                self.port,
                cohort.display()
            ),
        )
        .unwrap();
        path
    }

    /// Starts the server, waits until it listens, starts the clients and waits for everyone to finish.
    /// Returns the server's stdout and each client's.
    fn go(&self, clients: &[PathBuf]) -> (String, Vec<String>) {
        let mut server = Command::new(env!("CARGO_BIN_EXE_fedslm"))
            .args(["server", "--config"])
            .arg(self.dir.join("server.toml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .map(|l| l.unwrap_or_default())
            .unwrap_or_default();
        assert!(first.starts_with("listening on"), "server said: {first}");
        let reader = std::thread::spawn(move || {
            let mut all = first;
            for l in lines.map_while(Result::ok) {
                all.push('\n');
                all.push_str(&l);
            }
            all
        });
        let children: Vec<Child> = clients
            .iter()
            .map(|c| {
                Command::new(env!("CARGO_BIN_EXE_fedslm"))
                    .args(["client", "--max-attempts", "5", "--config"])
                    .arg(c)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .env("RUST_LOG", "warn")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let start = Instant::now();
        let mut outputs = Vec::new();
        for child in children {
            outputs.push(wait(child, start));
        }
        let status = wait_status(&mut server, start);
        let server_out = reader.join().unwrap();
        let mut err = String::new();
        if let Some(mut e) = server.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        assert!(
            status,
            "server failed:\n{server_out}\n{err}\nclients:\n{}",
            outputs.join("\n---\n")
        );
        (server_out, outputs)
    }
}

fn wait_status(child: &mut Child, start: Instant) -> bool {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("a process ran past {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait(mut child: Child, start: Instant) -> String {
    let ok = wait_status(&mut child, start);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "client failed:\n{text}");
    text
}

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/clinical")
}

#[test]
fn federated_newton_over_the_reference_centres_equals_the_pooled_statsmodels_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centres = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centres.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 30\n",
    );
    let (ok, _, err) = fedslm(&[
        "model",
        "init",
        "--model",
        "clinical",
        "--out",
        &d.join("init.safetensors").display().to_string(),
    ]);
    assert!(ok, "{err}");
    let clients: Vec<PathBuf> = centres
        .iter()
        .map(|c| run.client_config(c, &reference().join(c), ""))
        .collect();
    let (server_out, client_outs) = run.go(&clients);
    assert!(server_out.contains("run completed after"), "{server_out}");
    for out in &client_outs {
        assert!(out.contains("finished after"), "{out}");
    }

    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(reference().join("expected_pooled_logit.json")).unwrap(),
    )
    .unwrap();
    let (weights, card) = fedslm_model::load(&d.join("out/clinical.safetensors")).unwrap();
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
    // What each centre sent: its statistics only, f64, one file per round.
    let sent = std::fs::read_dir(d.join("center-a/sent")).unwrap().count();
    let rounds = std::fs::read_to_string(d.join("out/rounds.jsonl")).unwrap();
    assert_eq!(sent, rounds.lines().count());
    let (first, _) = fedslm_model::load(&d.join("center-a/sent/round-0001.safetensors")).unwrap();
    let mut names: Vec<&str> = first.tensors().iter().map(|t| t.name()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "newton.fitted_exactly",
            "newton.gradient",
            "newton.hessian",
            "newton.log_likelihood"
        ]
    );
}

#[test]
fn three_centres_train_one_validates_and_each_global_model_is_the_weighted_mean_of_what_was_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = common::tiny_synth_cohort(d);
    let centres = [
        ("center-a", "train"),
        ("center-b", "train"),
        ("center-c", "train"),
        ("external", "validate"),
    ];
    let run = Run::new(
        d,
        &centres,
        "initial_model = \"init.safetensors\"\nrounds = 2\nlocal_epochs = 1\nbatch_size = 4\n\
         strategy = \"fedprox\"\nproximal_mu = 0.01\n",
    );
    let preprocess = "[preprocess]\nsize = 32\nneighbours = 0\n";
    let clients: Vec<PathBuf> = centres
        .iter()
        .map(|(c, _)| run.client_config(c, &cohort.join(c), preprocess))
        .collect();
    let (ok, _, err) = fedslm(&[
        "model",
        "init",
        "--model",
        "mri",
        "--config",
        &clients[0].display().to_string(),
        "--seed",
        "5",
        "--out",
        &d.join("init.safetensors").display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (server_out, outs) = run.go(&clients);
    assert!(
        server_out.contains("run completed after 2 rounds"),
        "{server_out}"
    );
    assert!(
        !outs[3].contains("trained"),
        "the validation centre never trains: {}",
        outs[3]
    );
    assert!(!d.join("external/sent").exists());

    let rounds: Vec<Value> = std::fs::read_to_string(d.join("out/rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    let mut previous = fedslm_model::load(&d.join("init.safetensors")).unwrap().0;
    for round in 1..=2 {
        let file = format!("round-{round:04}.safetensors");
        let checkpoint = rounds[round - 1]["checkpoint"].as_str().unwrap();
        let (global, _) = fedslm_model::load(
            &d.join("out/checkpoints")
                .join(format!("{checkpoint}.safetensors")),
        )
        .unwrap();
        let sent: Vec<(fedslm_protocol::Weights, f64)> = centres[..3]
            .iter()
            .map(|(c, _)| {
                let (w, card) = fedslm_model::load(&d.join(c).join("sent").join(&file)).unwrap();
                (w, card.training["examples"].as_f64().unwrap())
            })
            .collect();
        let total: f64 = sent.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 26.0, "every labelled patient of a, b and c, once");
        for t in global.tensors() {
            let mut mean = vec![0.0; t.element_count()];
            for (w, n) in &sent {
                for (m, v) in mean
                    .iter_mut()
                    .zip(w.require(t.name()).unwrap().to_f64_vec())
                {
                    *m += n * v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= total);
            for (g, m) in t.to_f64_vec().iter().zip(&mean) {
                assert!(
                    (g - m).abs() <= 1e-6 * m.abs().max(1e-3),
                    "round {round}, {}: {g} vs {m}",
                    t.name()
                );
            }
        }
        assert_ne!(global, previous, "round {round} changed the model");
        previous = global;
    }
    let contributors: Vec<&str> = rounds[0]["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["center"].as_str().unwrap())
        .collect();
    assert!(
        !contributors.contains(&"external") && contributors.len() == 3,
        "{contributors:?}"
    );
    let (final_model, card) = fedslm_model::load(&d.join("out/mri.safetensors")).unwrap();
    assert_eq!(final_model, previous);
    assert_eq!(card.training["strategy"], "fedprox");
}

#[test]
fn a_node_checks_its_cohort_before_anything_leaves_and_dry_run_says_what_would() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = common::tiny_synth_cohort(d);
    let run = Run::new(d, &[("center-a", "train")], "");
    let preprocess = "[preprocess]\nsize = 32\nneighbours = 0\n";
    let config = run.client_config("center-a", &cohort.join("center-a"), preprocess);
    let config = config.display().to_string();
    let (ok, out, err) = fedslm(&["client", "--config", &config, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cohort: centre center-a, 10 patients (4 with SLM), 10 with images"),
        "{out}"
    );
    assert!(
        out.contains("Hello, ") && out.contains("FitResult, "),
        "{out}"
    );
    assert!(out.contains("never: images, patient ids"), "{out}");

    // A broken manifest stops the node before it connects to anything (no server runs here).
    let manifest = cohort.join("center-a/manifest.csv");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = text.replacen(",M,", ",X,", 1);
    assert_ne!(broken, text);
    std::fs::write(&manifest, broken).unwrap();
    let (ok, _, err) = fedslm(&["client", "--config", &config, "--max-attempts", "0"]);
    assert!(!ok);
    assert!(err.contains("manifest.csv") && err.contains("sex"), "{err}");
    assert!(!err.contains("connect"), "{err}");
}
