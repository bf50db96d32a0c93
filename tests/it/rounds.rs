//! Rounds over loopback QUIC with mutual TLS, in one process: a misbehaving centre is refused, told why, and
//! every round still completes with the honest centres' aggregate; the validation centre is never asked to
//! train; a client whose server restarts comes back by itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::id;
use fedslm_certs::{IssueOptions, Pki};
use fedslm_client::{Backoff, ClientConfig, Declined, LocalTrainer, NodeEvent};
use fedslm_protocol::{
    DType, EvalReport, EvaluateTask, FitResult, FitTask, PlacementReport, PlacementTask,
    SampleCounts, Tensor, TensorRole, Weights,
};
use fedslm_server::{CheckpointWriter, Coordinator, Outcome, Server, ServerConfig, Store};

fn model(conv: &[f32], var: f32) -> Weights {
    Weights::from_tensors(vec![
        Tensor::from_f32("conv.weight", vec![2, 2], TensorRole::Parameter, conv).unwrap(),
        Tensor::from_f32(
            "bn.running_var",
            vec![1],
            TensorRole::BatchNormStatistic,
            &[var],
        )
        .unwrap(),
    ])
    .unwrap()
}

fn shifted(w: &Weights, by: f32) -> Weights {
    let conv: Vec<f32> = w
        .require("conv.weight")
        .unwrap()
        .to_f32_vec()
        .iter()
        .map(|v| v + by)
        .collect();
    let var = w.require("bn.running_var").unwrap().to_f32_vec()[0];
    model(&conv, var)
}

/// What the test centres declare in their Hello: more patients than any of their updates claims.
const DECLARED: SampleCounts = SampleCounts {
    patients: 10_000,
    positives: 1_000,
    with_images: 10_000,
};

/// Moves every weight by `by`, as if it had trained, on `examples` patients.
struct Honest {
    by: f32,
    examples: u64,
    asked: Arc<Mutex<Vec<u32>>>,
}

impl LocalTrainer for Honest {
    type Error = Declined;

    fn fit(&mut self, _run_id: &str, task: &FitTask) -> Result<FitResult, Declined> {
        self.asked.lock().unwrap().push(task.round);
        Ok(FitResult {
            round: task.round,
            weights: shifted(&task.weights, self.by),
            examples: self.examples,
            train_loss: 0.5,
        })
    }

    fn evaluate(&mut self, _: &str, _: &EvaluateTask) -> Result<EvalReport, Declined> {
        Err(Declined("evaluate in this test"))
    }

    fn placements(&mut self, _: &PlacementTask) -> Result<PlacementReport, Declined> {
        Err(Declined("compare models in this test"))
    }
}

/// Breaks one rule per round.
struct Misbehaving;

impl LocalTrainer for Misbehaving {
    type Error = Declined;

    fn fit(&mut self, _run_id: &str, task: &FitTask) -> Result<FitResult, Declined> {
        let ok = shifted(&task.weights, 1.0);
        let conv = ok.tensors()[0].clone();
        let var = ok.tensors()[1].clone();
        let mut round = task.round;
        let weights = match task.round {
            1 => model(&[f32::NAN, 0.0, 0.0, 0.0], 1.0),
            2 => Weights::from_tensors(vec![
                Tensor::from_f32("conv.weight", vec![4], TensorRole::Parameter, &[0.0; 4]).unwrap(),
                var,
            ])
            .unwrap(),
            3 => shifted(&task.weights, 1000.0),
            4 => {
                let spy = Tensor::from_f32("spy", vec![1], TensorRole::Parameter, &[0.0]).unwrap();
                Weights::from_tensors(vec![conv, var, spy]).unwrap()
            }
            5 => Weights::from_tensors(vec![
                Tensor::from_f32_as(
                    "conv.weight",
                    vec![2, 2],
                    TensorRole::Parameter,
                    &conv.to_f32_vec(),
                    DType::F16,
                )
                .unwrap(),
                var,
            ])
            .unwrap(),
            6 => Weights::from_tensors(vec![
                conv,
                Tensor::from_f32("bn.running_var", vec![1], TensorRole::Parameter, &[1.0]).unwrap(),
            ])
            .unwrap(),
            7 => Weights::from_tensors(vec![conv]).unwrap(),
            _ => {
                round += 100;
                ok
            }
        };
        Ok(FitResult {
            round,
            weights,
            examples: 1000,
            train_loss: 0.1,
        })
    }

    fn evaluate(&mut self, _: &str, _: &EvaluateTask) -> Result<EvalReport, Declined> {
        Err(Declined("evaluate in this test"))
    }

    fn placements(&mut self, _: &PlacementTask) -> Result<PlacementReport, Declined> {
        Err(Declined("compare models in this test"))
    }
}

const EXPECTED_REFUSALS: [&str; 8] = [
    "tensor conv.weight holds a non-finite value at index 0",
    "tensor conv.weight has shape [4], the global model's has [2, 2]",
    "beyond the bound of 1.0000e2",
    "tensor spy is not part of the global model",
    "tensor conv.weight is F16, the global model's is F32",
    "tensor bn.running_var has role Parameter, the global model's has BatchNormStatistic",
    "tensor bn.running_var of the global model is missing",
    "the update is for round 108, the task was for round 8",
];

struct Setup {
    _dir: tempfile::TempDir,
    server: ServerConfig,
    configs: BTreeMap<String, ClientConfig>,
}

fn setup(round_keys: &str) -> Setup {
    setup_with(round_keys, &crate::common::TINY_CENTRES)
}

/// A run of `centers` (id, role).
fn setup_with(round_keys: &str, centers: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(
        &dir.path().join("pki"),
        "test",
        "localhost",
        &["127.0.0.1".parse().unwrap()],
    )
    .unwrap();
    // A server of these tests may be started again on its port.
    let port = crate::common::process::free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut toml =
        format!("listen = \"{addr}\"\npki = \"pki\"\nrun_id = \"rounds\"\n{round_keys}\n");
    for &(c, role) in centers {
        toml.push_str(&format!("[[center]]\nid = \"{c}\"\nrole = \"{role}\"\n"));
    }
    let config = ServerConfig::parse(&toml, &dir.path().join("server.toml")).unwrap();
    let mut configs = BTreeMap::new();
    for &(c, _) in centers {
        let out = dir.path().join(c);
        pki.issue(&id(c), &out, IssueOptions::days(30).unwrap())
            .unwrap();
        let client = format!(
            "center = \"{c}\"\nserver = \"{addr}\"\nserver_name = \"localhost\"\n\
             ca = \"ca.pem\"\ncert = \"{c}.pem\"\nkey = \"{c}.key\"\n"
        );
        configs.insert(
            c.to_string(),
            ClientConfig::parse(&client, &out.join("client.toml")).unwrap(),
        );
    }
    Setup {
        _dir: dir,
        server: config,
        configs,
    }
}

/// A new run's store in the setup's folder, and a checkpoint writer that stores the tensors' bytes.
fn store(s: &Setup, name: &str) -> (Arc<Store>, CheckpointWriter) {
    let mut store = Store::open(&s._dir.path().join(name), None).unwrap();
    store.begin("run", &BTreeMap::new(), 8, false).unwrap();
    let writer: CheckpointWriter = Box::new(|_, w, path| {
        let bytes: Vec<u8> = w
            .tensors()
            .iter()
            .flat_map(|t| t.bytes().to_vec())
            .collect();
        std::fs::write(path, bytes).map_err(Into::into)
    });
    (Arc::new(store), writer)
}

/// The round machine of a run whose enrolment and rounds are `config`'s.
fn coordinator(config: &ServerConfig) -> Coordinator {
    Coordinator::new(
        config
            .round_settings(fedslm_protocol::ModelKind::Mri)
            .unwrap(),
        config.enrolment.centers.clone(),
        model(&[0.0; 4], 1.0),
        &[],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_broken_rule_is_refused_and_told_and_every_round_commits_the_honest_mean() {
    let keys = "rounds = 8\nquorum = 2\nnorm_bound = 100.0\nround_deadline_secs = 20";
    let s = setup(keys);
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let mut events = server.subscribe();
    let (store, writer) = store(&s, "out");
    let run = tokio::spawn(async move {
        server
            .run_rounds(machine, store, writer, std::future::pending())
            .await
    });

    let asked_a = Arc::new(Mutex::new(Vec::new()));
    let asked_v = Arc::new(Mutex::new(Vec::new()));
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    let backoff = Backoff {
        attempts: Some(2),
        ..Backoff::default()
    };
    for (c, cfg) in s.configs.clone() {
        let asked_a = asked_a.clone();
        let asked_v = asked_v.clone();
        let refusals = refusals.clone();
        clients.push(tokio::spawn(async move {
            let counts = DECLARED;
            let record = move |e: NodeEvent| {
                if let NodeEvent::Refused { round, reason } = e {
                    refusals.lock().unwrap().push((round, reason));
                }
            };
            match c.as_str() {
                "center-a" => {
                    let t = Honest {
                        by: 1.0,
                        examples: 10,
                        asked: asked_a,
                    };
                    fedslm_client::run(&cfg, counts, t, backoff, record).await
                }
                "center-b" => {
                    let t = Honest {
                        by: 3.0,
                        examples: 30,
                        asked: Arc::default(),
                    };
                    fedslm_client::run(&cfg, counts, t, backoff, record).await
                }
                "center-c" => fedslm_client::run(&cfg, counts, Misbehaving, backoff, record).await,
                _ => {
                    let t = Honest {
                        by: 0.0,
                        examples: 1,
                        asked: asked_v,
                    };
                    fedslm_client::run(&cfg, counts, t, backoff, record).await
                }
            }
        }));
    }
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ended within 60 s")
        .unwrap();
    for c in clients {
        let finish = c.await.unwrap().expect("every client got Finish");
        assert_eq!(finish.rounds_completed, 8);
    }
    let Some(Outcome::Completed {
        rounds: 8, weights, ..
    }) = outcome
    else {
        panic!("{outcome:?}")
    };
    // Each round: (10 (g + 1) + 30 (g + 3)) / 40 = g + 2.5, whatever centre c sent.
    assert_eq!(
        weights.require("conv.weight").unwrap().to_f32_vec(),
        vec![20.0; 4]
    );
    let refusals = refusals.lock().unwrap().clone();
    assert_eq!(refusals.len(), 8, "{refusals:?}");
    for (i, ((round, reason), want)) in refusals.iter().zip(EXPECTED_REFUSALS).enumerate() {
        assert_eq!(*round as usize, i + 1);
        assert!(
            reason.contains(want),
            "round {round}: {reason:?} lacks {want:?}"
        );
    }
    assert_eq!(*asked_a.lock().unwrap(), (1..=8).collect::<Vec<u32>>());
    assert!(
        asked_v.lock().unwrap().is_empty(),
        "the validation centre never trains"
    );
    // The server's records say the same.
    let mut committed = 0;
    while let Ok(e) = events.try_recv() {
        if let fedslm_server::ServerEvent::RoundCommitted(r) = e {
            committed += 1;
            assert_eq!(r.contributions.len(), 2);
            assert_eq!(r.refused.len(), 1);
            assert_eq!(r.refused[0].0, id("center-c"));
        }
    }
    assert_eq!(committed, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_server_restarts_reconnects_by_itself_and_finishes_the_run() {
    server_restarts(crate::common::Transport::Quic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_over_tcp_whose_server_restarts_reconnects_by_itself_and_finishes_the_run() {
    server_restarts(crate::common::Transport::Tcp).await
}

async fn server_restarts(transport: crate::common::Transport) {
    let keys = "rounds = 1\nquorum = 1\nround_start_grace_secs = 1";
    let mut s = setup(keys);
    if transport == crate::common::Transport::Tcp {
        // TLS over TCP on the same port number (the server's default), as a node behind a UDP-blocking
        // firewall is told.
        for c in s.configs.values_mut() {
            c.route.transport = fedslm_client::TransportChoice::Tcp;
        }
    }
    // First a server that only admits, then stops as a restarted machine would.
    let first = Arc::new(Server::bind(s.server.clone()).unwrap());
    let mut first_events = first.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = first.clone();
    let first_run = tokio::spawn(async move {
        serving
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let cfg = s.configs["center-a"].clone();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(1),
        attempts: Some(20),
    };
    let client = tokio::spawn(async move {
        let t = Honest {
            by: 1.0,
            examples: 5,
            asked: Arc::default(),
        };
        fedslm_client::run(&cfg, DECLARED, t, backoff, move |e| {
            seen.lock().unwrap().push(e)
        })
        .await
    });
    // Stop the first server only once the client itself counts as admitted (it has read Welcome).
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            first_events.recv().await,
            Ok(fedslm_server::ServerEvent::Admitted { .. })
        ) {}
        while !events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, NodeEvent::Admitted { .. }))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("admitted by the first server");
    stop.send(()).unwrap();
    first_run.await.unwrap();
    drop(first_events);
    drop(first);

    // The same address again, now running the rounds: the client comes back by itself.
    let second = loop {
        match Server::bind(s.server.clone()) {
            Ok(server) => break Arc::new(server),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let machine = coordinator(&s.server);
    let (store, writer) = store(&s, "out");
    let run = tokio::spawn(async move {
        second
            .run_rounds(machine, store, writer, std::future::pending())
            .await
    });
    let finish = tokio::time::timeout(Duration::from_secs(60), client)
        .await
        .expect("back and finished within 60 s")
        .unwrap()
        .unwrap();
    assert_eq!(finish.rounds_completed, 1);
    let outcome = run.await.unwrap();
    assert!(
        matches!(outcome, Some(Outcome::Completed { rounds: 1, .. })),
        "{outcome:?}"
    );
    let events = events.lock().unwrap();
    let reconnecting = events
        .iter()
        .position(|e| matches!(e, NodeEvent::Reconnecting { reason, .. } if reason.contains("shutting down")))
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(matches!(events[0], NodeEvent::Admitted { .. }));
    assert!(
        events[reconnecting..]
            .iter()
            .any(|e| matches!(e, NodeEvent::Admitted { .. })),
        "{events:?}"
    );
    assert!(events.contains(&NodeEvent::Accepted { round: 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_centers_cost_one_deadline_and_never_the_honest_answers() {
    // The silent centres come first in every round's task order, so that they would take the server's
    // result permits first if a permit were taken before an answer began to come.
    let centers = [
        ("center-a", "train"),
        ("center-b", "train"),
        ("center-c", "train"),
        ("center-d", "train"),
    ];
    let keys =
        "rounds = 2\nquorum = 2\nround_deadline_secs = 3\nround_retries = 0\nnorm_bound = 100.0";
    let s = setup_with(keys, &centers);
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let mut events = server.subscribe();
    let (store, writer) = store(&s, "out");
    let run = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .run_rounds(machine, store, writer, std::future::pending())
                .await
        })
    };
    // Connected and admitted, but they never take a task.
    let mut silent = Vec::new();
    for c in ["center-a", "center-b"] {
        silent.push(
            fedslm_client::connect(&s.configs[c], DECLARED)
                .await
                .unwrap(),
        );
    }
    let backoff = Backoff {
        attempts: Some(2),
        ..Backoff::default()
    };
    let mut clients = Vec::new();
    for (c, by) in [("center-c", 1.0), ("center-d", 3.0)] {
        let cfg = s.configs[c].clone();
        let t = Honest {
            by,
            examples: 10,
            asked: Arc::default(),
        };
        clients.push(tokio::spawn(async move {
            fedslm_client::run(&cfg, DECLARED, t, backoff, |_| {}).await
        }));
    }
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ended within 30 s")
        .unwrap();
    let Some(Outcome::Completed { rounds: 2, .. }) = outcome else {
        panic!("{outcome:?}")
    };
    let mut committed = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let fedslm_server::ServerEvent::RoundCommitted(r) = e {
            let mut answered: Vec<String> = r
                .contributions
                .iter()
                .map(|c| c.center.to_string())
                .collect();
            answered.sort();
            let silent: Vec<String> = r.silent.iter().map(|c| c.to_string()).collect();
            committed.push((answered, silent));
            // One deadline (3 s) per round, not three.
            assert!(r.duration < Duration::from_secs(6), "{:?}", r.duration);
            assert_eq!(r.retries, 0);
        }
    }
    let want = (
        vec!["center-c".to_string(), "center-d".to_string()],
        vec!["center-a".to_string(), "center-b".to_string()],
    );
    assert_eq!(committed, vec![want.clone(), want]);
    for c in clients {
        c.await.unwrap().expect("the honest centres got Finish");
    }
    drop(silent);
}

/// Trains as [`Honest`] does, taking `secs` per round.
struct Slow(Honest, f32);

impl LocalTrainer for Slow {
    type Error = Declined;

    fn fit(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, Declined> {
        std::thread::sleep(Duration::from_secs_f32(self.1));
        self.0.fit(run_id, task)
    }

    fn evaluate(&mut self, r: &str, t: &EvaluateTask) -> Result<EvalReport, Declined> {
        self.0.evaluate(r, t)
    }

    fn placements(&mut self, t: &PlacementTask) -> Result<PlacementReport, Declined> {
        self.0.placements(t)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moment_of_impersonation_does_not_remove_the_honest_node_and_the_run_completes() {
    // Every training centre is needed, so the run cannot finish without center-a's honest node.
    let keys = "rounds = 3\nquorum = 3\nround_deadline_secs = 10\nround_retries = 5";
    let s = setup(keys);
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let mut events = server.subscribe();
    let (store, writer) = store(&s, "out");
    let run = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .run_rounds(machine, store, writer, std::future::pending())
                .await
        })
    };
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(1),
        attempts: Some(3),
    };
    let reconnects = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for (c, cfg) in s.configs.clone() {
        let reconnects = reconnects.clone();
        let t = Slow(
            Honest {
                by: 1.0,
                examples: 10,
                asked: Arc::default(),
            },
            0.7,
        );
        clients.push(tokio::spawn(async move {
            let record = move |e: NodeEvent| {
                if let NodeEvent::Reconnecting { reason, .. } = e {
                    reconnects.lock().unwrap().push((c.clone(), reason));
                }
            };
            fedslm_client::run(&cfg, DECLARED, t, backoff, record).await
        }));
    }
    // Once every centre is in, an impostor with center-a's certificate and key holds a connection for a
    // second.
    for _ in 0..4 {
        while !matches!(
            events.recv().await.unwrap(),
            fedslm_server::ServerEvent::Admitted { .. }
        ) {}
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let impostor = fedslm_client::connect(&s.configs["center-a"], DECLARED)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    impostor.close(0, "").await;

    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ended within 60 s")
        .unwrap();
    let Some(Outcome::Completed { rounds: 3, .. }) = outcome else {
        panic!("{outcome:?}")
    };
    for c in clients {
        let finish = c.await.unwrap().expect("every honest node got Finish");
        assert_eq!(finish.rounds_completed, 3);
    }
    let reconnects = reconnects.lock().unwrap().clone();
    assert!(
        reconnects
            .iter()
            .any(|(c, reason)| c == "center-a" && reason.contains("took over")),
        "{reconnects:?}"
    );
    // The takeover is in the audit, with both addresses.
    let mut superseded = 0;
    while let Ok(e) = events.try_recv() {
        if let fedslm_server::ServerEvent::Superseded { center, .. } = e {
            assert_eq!(center, id("center-a"));
            superseded += 1;
        }
    }
    assert!(superseded >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_strangers_are_audited_once_per_interval_not_once_per_attempt() {
    let s = setup("rounds = 1\nnorm_bound = 100.0");
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let (store, writer) = store(&s, "out");
    let audit = store.clone();
    let run = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .run_rounds(machine, store, writer, std::future::pending())
                .await
        })
    };
    // Five handshakes without a certificate, each refused.
    let ca = s.configs["center-a"].tls.ca.clone();
    let tls = fedslm_certs::stranger_client_config(&ca).unwrap();
    let config = fedslm_certs::quic_client_config(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = s.server.listen;
    for _ in 0..5 {
        let connecting = endpoint
            .connect_with(config.clone(), addr, "localhost")
            .unwrap();
        if let Ok(c) = connecting.await {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
        }
    }
    let backoff = Backoff {
        attempts: Some(2),
        ..Backoff::default()
    };
    let mut clients = Vec::new();
    for (_, cfg) in s.configs.clone() {
        let t = Honest {
            by: 1.0,
            examples: 10,
            asked: Arc::default(),
        };
        clients.push(tokio::spawn(async move {
            fedslm_client::run(&cfg, DECLARED, t, backoff, |_| {}).await
        }));
    }
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ended")
        .unwrap();
    assert!(
        matches!(outcome, Some(Outcome::Completed { .. })),
        "{outcome:?}"
    );
    let events: Vec<serde_json::Value> = audit
        .audit_entries()
        .unwrap()
        .iter()
        .map(|(_, bytes)| serde_json::from_slice(bytes).unwrap())
        .collect();
    let per_attempt = events
        .iter()
        .filter(|e| e["event"] == "handshake_failed")
        .count();
    let tallies: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "handshakes_failed")
        .collect();
    assert_eq!(per_attempt, 0);
    assert_eq!(tallies.len(), 1, "{tallies:?}");
    assert_eq!(tallies[0]["total"], 5);
    assert_eq!(tallies[0]["by_reason"]["CertificateRequired"], 5);
    for c in clients {
        c.await.unwrap().unwrap();
    }
}

/// The value of the sample `name` (with its labels, as written) in a metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_scraped_during_a_run_agree_with_the_stored_rounds() {
    let s = setup("rounds = 3\nquorum = 2\nnorm_bound = 100.0\nmetrics_listen = \"127.0.0.1:0\"");
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let url = format!("http://{}/metrics", server.metrics_addr().unwrap());
    let mut events = server.subscribe();
    let (store, writer) = store(&s, "out");
    let stored = store.clone();
    let run = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .run_rounds(machine, store, writer, std::future::pending())
                .await
        })
    };
    let backoff = Backoff {
        attempts: Some(2),
        ..Backoff::default()
    };
    let mut clients = Vec::new();
    for (c, cfg) in s.configs.clone() {
        // Slow enough that the next round does not commit while the test scrapes.
        let t = Slow(
            Honest {
                by: if c == "center-c" { 1e6 } else { 1.0 },
                examples: 10,
                asked: Arc::default(),
            },
            0.5,
        );
        clients.push(tokio::spawn(async move {
            fedslm_client::run(&cfg, DECLARED, t, backoff, |_| {}).await
        }));
    }
    let mut scraped = 0;
    while scraped < 3 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("a round within 30 s")
            .unwrap();
        let fedslm_server::ServerEvent::RoundCommitted(record) = event else {
            continue;
        };
        let text = {
            let url = url.clone();
            tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_string())
                .await
                .unwrap()
                .unwrap()
        };
        // The rounds the store holds (rounds.jsonl's), their times, and the centre refused each round.
        let rounds = stored.rounds().unwrap();
        assert_eq!(rounds.len() as u32, record.round);
        assert_eq!(
            sample(&text, "fedslm_rounds_committed_total"),
            rounds.len() as f64
        );
        assert_eq!(
            sample(&text, "fedslm_round_duration_seconds_count"),
            rounds.len() as f64
        );
        let seconds: f64 = rounds.iter().map(|r| r.seconds).sum();
        assert!(
            (sample(&text, "fedslm_round_duration_seconds_sum") - seconds).abs() < 1e-6,
            "{seconds}\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                "fedslm_refusals_total{kind=\"update\",reason=\"norm\"}"
            ),
            rounds.len() as f64
        );
        assert_eq!(
            sample(&text, "fedslm_centers_connected{transport=\"quic\"}"),
            4.0
        );
        assert!(sample(&text, "fedslm_received_bytes_total") > 0.0);
        assert!(sample(&text, "fedslm_commit_duration_seconds_count") >= rounds.len() as f64);
        scraped += 1;
    }
    // Anything else than GET /metrics is not found.
    let missing = {
        let url = url.replace("/metrics", "/other");
        tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
            Err(ureq::Error::Status(code, _)) => code,
            other => panic!("{other:?}"),
        })
        .await
        .unwrap()
    };
    assert_eq!(missing, 404);
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ended")
        .unwrap();
    assert!(
        matches!(outcome, Some(Outcome::Completed { .. })),
        "{outcome:?}"
    );
    for c in clients {
        c.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_center_asks_its_status_over_its_own_connection_and_its_node_keeps_its_place() {
    let s = setup("rounds = 3\nquorum = 2\nnorm_bound = 100.0");
    let machine = coordinator(&s.server);
    let server = Arc::new(Server::bind(s.server.clone()).unwrap());
    let mut events = server.subscribe();
    let (store, writer) = store(&s, "out");
    let run = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .run_rounds(machine, store, writer, std::future::pending())
                .await
        })
    };
    let backoff = Backoff {
        attempts: Some(2),
        ..Backoff::default()
    };
    let mut clients = Vec::new();
    for (c, cfg) in s.configs.clone() {
        // center-c's updates are beyond the norm bound every round.
        let t = Slow(
            Honest {
                by: if c == "center-c" { 1e6 } else { 1.0 },
                examples: 10,
                asked: Arc::default(),
            },
            0.5,
        );
        clients.push(tokio::spawn(async move {
            fedslm_client::run(&cfg, DECLARED, t, backoff, |_| {}).await
        }));
    }
    let mut superseded = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("a round within 30 s")
            .unwrap()
        {
            fedslm_server::ServerEvent::RoundCommitted(r) if r.round == 2 => break,
            fedslm_server::ServerEvent::Superseded { .. } => superseded += 1,
            _ => {}
        }
    }
    let (refused, _) = fedslm_client::status(&s.configs["center-c"]).await.unwrap();
    assert_eq!(
        (refused.run_id.as_str(), refused.state.as_str()),
        ("run", "running")
    );
    assert!(refused.rounds_committed >= 2, "{refused:?}");
    for part in &refused.rounds {
        assert_eq!(
            part.outcome,
            fedslm_protocol::RoundOutcome::Refused,
            "{refused:?}"
        );
        assert!(part.reason.contains("beyond the bound"), "{part:?}");
    }
    let (honest, _) = fedslm_client::status(&s.configs["center-a"]).await.unwrap();
    for part in &honest.rounds {
        assert_eq!(part.outcome, fedslm_protocol::RoundOutcome::Contributed);
        assert_eq!(part.examples, 10);
    }
    // A certificate of the same CA for a centre not enrolled is refused by name.
    let pki = Pki::open(&s._dir.path().join("pki")).unwrap();
    let stranger = s._dir.path().join("center-z");
    pki.issue(&id("center-z"), &stranger, IssueOptions::days(30).unwrap())
        .unwrap();
    let mut z = s.configs["center-a"].clone();
    z.center = id("center-z");
    z.tls.cert = stranger.join("center-z.pem");
    z.tls.key = stranger.join("center-z.key");
    match fedslm_client::status(&z).await {
        Err(fedslm_client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, fedslm_protocol::ErrorCode::NotEnrolled)
        }
        other => panic!("{other:?}"),
    }
    // The nodes kept their places: the run completes with every round, and no connection was replaced.
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ended")
        .unwrap();
    assert!(
        matches!(outcome, Some(Outcome::Completed { rounds: 3, .. })),
        "{outcome:?}"
    );
    while let Ok(e) = events.try_recv() {
        if matches!(e, fedslm_server::ServerEvent::Superseded { .. }) {
            superseded += 1;
        }
    }
    assert_eq!(superseded, 0);
    for c in clients {
        c.await.unwrap().unwrap();
    }
}
