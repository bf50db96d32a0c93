//! `fedslm bench rounds`: the cost of a round itself, without training. A real `fedslm server` process with a
//! fresh PKI runs FedAvg rounds for clients in this process that send the task's weights straight back. It
//! prints seconds per round (the server's own timing, task out to commit) and the server's peak memory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fedslm_certs::{IssueOptions, Pki};
use fedslm_client::{Backoff, ClientConfig, LocalTrainer};
use fedslm_model::{save, NetConfig, Network, NetworkKind};
use fedslm_protocol::{CenterId, EvalReport, EvaluateTask, FitResult, FitTask, SampleCounts};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Seconds per FedAvg round and the server's peak memory, for echoing clients over loopback QUIC.
    Rounds(RoundsArgs),
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
    fn fit(&mut self, task: &FitTask) -> Result<FitResult, String> {
        Ok(FitResult {
            round: task.round,
            weights: task.weights.clone(),
            examples: 10,
            train_loss: 0.5,
        })
    }

    fn evaluate(&mut self, _: &EvaluateTask) -> Result<EvalReport, String> {
        Err("the round benchmark does not evaluate".into())
    }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Rounds(args) = cmd;
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
        let network = Network::new(NetworkKind::Mri, cfg, 1)?;
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
