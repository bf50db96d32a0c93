//! `fedslm bench rounds`: the cost of a round itself, without training. A real `fedslm server` process with a
//! fresh PKI runs FedAvg rounds for clients in this process that send the task's weights straight back. It
//! prints seconds per round (the server's own timing, task out to commit) and the server's peak memory.
//! `fedslm bench commit`: the cost of making a round durable (checkpoint, fsync, sled flush) for a 45 MB model.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fedslm_certs::{IssueOptions, Pki};
use fedslm_client::{Backoff, ClientConfig, Declined, LocalTrainer};
use fedslm_model::{save, ModelKind, NetConfig, Network};
use fedslm_protocol::{
    CenterId, EvalReport, EvaluateTask, FitResult, FitTask, PlacementReport, PlacementTask,
    SampleCounts,
};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Seconds per FedAvg round and the server's peak memory, for echoing clients over loopback QUIC.
    Rounds(RoundsArgs),
    /// The cost of committing a round to the server's store: the checkpoint file written, hashed, fsynced
    /// and renamed, then the sled record flushed and the status files rewritten, for a ResNet-18 (45 MB).
    Commit(CommitArgs),
    /// Training and inference speed of the image networks, phase by phase, beside the identical network in
    /// PyTorch when it is installed: ours / PyTorch on the same threads.
    Train(super::bench_train::TrainBenchArgs),
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Commits to time; medians are reported.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Where to put the store (a folder on the disk the server's output will use; /tmp may be a RAM disk,
    /// where fsync costs nothing). Made and removed by the benchmark.
    #[arg(long, default_value = "fedslm-bench-commit")]
    dir: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct RoundsArgs {
    /// Numbers of centres, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,10,50")]
    centres: Vec<usize>,
    /// Models: `small` (ResNet-10 of width 20 on 9x64x64, about 0.5 M parameters) and `resnet18` (ResNet-18
    /// on 3x224x224, 11.2 M parameters), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "small,resnet18")]
    models: Vec<String>,
    /// Rounds per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// Answers every task with its own weights.
struct Echo;

impl LocalTrainer for Echo {
    type Error = Declined;

    fn fit(&mut self, task: &FitTask) -> Result<FitResult, Declined> {
        Ok(FitResult {
            round: task.round,
            weights: task.weights.clone(),
            examples: 10,
            train_loss: 0.5,
        })
    }

    fn evaluate(&mut self, _: &str, _: &EvaluateTask) -> Result<EvalReport, Declined> {
        Err(Declined("evaluate in the round benchmark"))
    }

    fn placements(&mut self, _: &PlacementTask) -> Result<PlacementReport, Declined> {
        Err(Declined("compare models in the round benchmark"))
    }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let args = match cmd {
        BenchCommand::Rounds(args) => args,
        BenchCommand::Commit(args) => return commit(args),
        BenchCommand::Train(args) => return super::bench_train::run(args),
    };
    println!(
        "model, parameters, MB, centres, s/round (median of {}), server peak MiB",
        args.rounds
    );
    for model in &args.models {
        let cfg = match model.as_str() {
            "small" => NetConfig {
                width: 20,
                ..NetConfig::compact(9, 64, 0)
            },
            "resnet18" => NetConfig::resnet18(3, 224, 0),
            other => bail!("unknown model {other:?}: use small or resnet18"),
        };
        let network = Network::new(ModelKind::Mri, cfg, 1)?;
        let weights = network.to_weights()?;
        for &n in &args.centres {
            let tmp = tempfile_dir()?;
            save(
                &tmp.join("init.safetensors"),
                &weights,
                &network.card(Default::default(), Default::default()),
            )?;
            let (seconds, peak) = one(&tmp, n, args.rounds)?;
            println!(
                "{model}, {}, {:.1}, {n}, {seconds:.3}, {peak:.0}",
                network.parameter_count(),
                weights.data_bytes() as f64 / 1e6,
            );
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "fedslm-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// One configuration: (median seconds per round, server peak MiB).
fn one(dir: &Path, centres: usize, rounds: u32) -> anyhow::Result<(f64, f64)> {
    let pki = Pki::init(
        &dir.join("pki"),
        "bench",
        "localhost",
        &["127.0.0.1".parse()?],
    )?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut toml = format!(
        "listen = \"127.0.0.1:{port}\"\npki = \"pki\"\nrun_id = \"bench\"\noutput = \"out\"\n\
         initial_model = \"init.safetensors\"\nrounds = {rounds}\n"
    );
    let mut configs = Vec::new();
    for i in 0..centres {
        let name = format!("c{i:03}");
        let id = CenterId::new(name.as_str())?;
        let node = dir.join(&name);
        pki.issue(&id, &node, IssueOptions::days(1)?)?;
        toml.push_str(&format!("[[center]]\nid = \"{name}\"\nrole = \"train\"\n"));
        configs.push(ClientConfig::parse(
            &format!(
                "center = \"{name}\"\nserver = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 ca = \"ca.pem\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n"
            ),
            &node.join("client.toml"),
        )?);
    }
    std::fs::write(dir.join("server.toml"), toml)?;
    let mut server = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "server", "--config"])
        .arg(dir.join("server.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_remove("RUST_LOG")
        .spawn()
        .context("cannot start the server")?;
    let mut lines = BufReader::new(server.stdout.take().context("no stdout")?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    if !first.starts_with("listening on") {
        bail!("the server said {first:?}");
    }
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for config in configs {
            tasks.push(tokio::spawn(async move {
                let backoff = Backoff {
                    attempts: Some(3),
                    ..Backoff::default()
                };
                fedslm_client::run(&config, SampleCounts::default(), Echo, backoff, |_| {}).await
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let mut peak = f64::NAN;
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("server peak memory: ") {
            peak = rest.trim_end_matches(" MiB").parse().unwrap_or(f64::NAN);
        }
    }
    let status = server.wait()?;
    if !status.success() {
        bail!("the server failed");
    }
    let mut seconds: Vec<f64> = std::fs::read_to_string(dir.join("out/rounds.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .collect();
    seconds.sort_by(f64::total_cmp);
    let median = seconds.get(seconds.len() / 2).copied().unwrap_or(f64::NAN);
    std::thread::sleep(Duration::from_millis(100));
    Ok((median, peak))
}

/// `fedslm bench commit`.
fn commit(args: CommitArgs) -> anyhow::Result<()> {
    use fedslm_server::store::{sha256_file, Store, StoredRound};
    use std::time::Instant;

    if args.dir.exists() {
        bail!(
            "{} exists; name a folder the benchmark may create and remove",
            args.dir.display()
        );
    }
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        let pki = dir.join("pki");
        Pki::init(&pki, "bench", "localhost", &[])?;
        let files = fedslm_certs::ServerTlsFiles::in_pki(&pki);
        let signer = fedslm_certs::Signer::from_files(&files.cert, &files.key)?;
        let out = dir.join("out");
        let mut store = Store::open(&out, Some(signer))?;
        store.begin("bench", &Default::default(), args.rounds, false)?;
        let network = Network::new(ModelKind::Mri, NetConfig::resnet18(3, 224, 0), 1)?;
        let weights = network.to_weights()?;
        let card = network.card(Default::default(), Default::default());
        let mb = weights.data_bytes() as f64 / 1e6;
        println!(
            "commit of a {mb:.1} MB model (ResNet-18, {} parameters), {} rounds, store on {} ({})",
            network.parameter_count(),
            args.rounds,
            filesystem_of(&out),
            out.display()
        );
        let (mut write, mut durable, mut record, mut total, mut baseline, mut hash) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for round in 1..=args.rounds {
            let card = fedslm_model::ModelCard {
                training: serde_json::json!({"mode": "federated", "round": round}),
                ..card.clone()
            };
            let t0 = Instant::now();
            let pending = store.pending_checkpoint(round);
            save(&pending, &weights, &card)?;
            let t1 = Instant::now();
            let checkpoint = store.put_checkpoint(&pending)?;
            let t2 = Instant::now();
            let r = fedslm_server::RoundRecord {
                round,
                retries: 0,
                contributions: vec![],
                refused: vec![],
                silent: vec![],
                duration: Duration::ZERO,
                log_likelihood: None,
                newton: None,
            };
            store.commit_round(&StoredRound::new(&r, checkpoint))?;
            let t3 = Instant::now();
            write.push((t1 - t0).as_secs_f64());
            durable.push((t2 - t1).as_secs_f64());
            record.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
        // The baseline, after the commits so that their writeback does not slow it: the model file written
        // as the server wrote it before it had a store (no fsync, no record).
        let mut plain = Vec::new();
        for round in 1..=args.rounds {
            let card = fedslm_model::ModelCard {
                training: serde_json::json!({"mode": "federated", "round": round}),
                ..card.clone()
            };
            let path = dir.join(format!("plain-{round}.safetensors"));
            let t = Instant::now();
            save(&path, &weights, &card)?;
            baseline.push(t.elapsed().as_secs_f64());
            plain.push(path);
        }
        for path in &plain {
            let t = Instant::now();
            sha256_file(path)?;
            hash.push(t.elapsed().as_secs_f64());
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2] * 1e3, v[v.len() - 1] * 1e3)
        };
        println!("phase, median ms, max ms");
        for (name, v) in [
            ("checkpoint written (safetensors, page cache)", &mut write),
            (
                "hashed (SHA-256), fsynced, renamed, folder fsynced",
                &mut durable,
            ),
            (
                "sled record + audit entry flushed, status files, head signed",
                &mut record,
            ),
            ("commit, all of it", &mut total),
            (
                "baseline: the same file written without fsync or record",
                &mut baseline,
            ),
            ("of which SHA-256 of the file alone", &mut hash),
        ] {
            let (m, x) = med(v);
            println!("{name}, {m:.1}, {x:.1}");
        }
        let ratio = med(&mut total).0 / med(&mut baseline).0;
        println!(
            "commit / baseline: {ratio:.2} (median); commit throughput {:.0} MB/s",
            mb / (med(&mut total).0 / 1e3)
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The filesystem type holding `path`, from /proc/mounts (the longest mount point that contains it).
fn filesystem_of(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown filesystem".into();
    };
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then(|| (at.len(), kind.to_string()))
        })
        .max()
        .map_or("unknown filesystem".into(), |(_, k)| k)
}
