//! `fedslm bench`: the measurements are `fedslm_study::bench`'s (rounds, commit) and `bench_train`'s; this
//! prints them.

use anyhow::bail;
use clap::{Args, Subcommand};
use fedslm_study::bench::flood::{flood, FloodSpec};
use fedslm_study::bench::{
    bench_network, commit_phases, filesystem_of, round_seconds, round_target, train::median,
    transport::echo_seconds, verdict,
};
use fedslm_transport::Transport;

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
    /// What strangers cost the server: its resident memory, sampled every 20 ms, and the honest centres'
    /// rounds while QUIC Initials that never go on, validated half-open handshakes and refused handshakes
    /// arrive, phase by phase.
    Flood(FloodArgs),
    /// The cost of differential privacy in training: a DP-SGD step (per-patient gradients clipped, summed
    /// and noised) against a plain step of the same network on the same patients and threads.
    Dp(DpArgs),
    /// The privacy-utility trade-off of `fedslm simulate` runs made at several `--dp-epsilon` budgets (and
    /// without) and seeds: each budget's AUC median and range over seeds, as a Markdown table and a figure.
    Tradeoff(TradeoffArgs),
    /// The spread of a `fedslm simulate --repeats` run, from its results.json: the table, and the figure
    /// (spread.png and .svg) drawn again.
    Spread(SpreadArgs),
}

#[derive(Debug, Args)]
pub struct SpreadArgs {
    /// The run's output folder (with its results.json).
    #[arg(long)]
    run: std::path::PathBuf,
    /// Where to write spread.png and .svg.
    #[arg(long, default_value = "figures")]
    figures: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct TradeoffArgs {
    /// The runs' output folders (each with its results.json).
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    runs: Vec<std::path::PathBuf>,
    /// Where to write privacy-tradeoff.png and .svg.
    #[arg(long, default_value = "figures")]
    figures: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct DpArgs {
    /// Networks, comma-separated: `default`, `small`, `resnet18` (as `fedslm bench train`).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    arch: Vec<String>,
    /// Patients per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Timed steps of each kind, after the warm-up.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Initials from an address that answers nothing, as spoofed ones would.
    #[arg(long, default_value_t = 30_000)]
    initials: usize,
    /// Connections from one address that answer their Retry and then stop.
    #[arg(long, default_value_t = 1_000)]
    validated: usize,
    /// Handshakes without a certificate, in sequence.
    #[arg(long, default_value_t = 1_000)]
    hostile: usize,
    /// Honest training centres, running rounds throughout.
    #[arg(long, default_value_t = 2)]
    centers: usize,
    /// The `fedslm` binary to run the server with (default: this one), to compare versions.
    #[arg(long)]
    server_program: Option<std::path::PathBuf>,
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
    centers: Vec<usize>,
    /// Models: `small` (ResNet-10 of width 20 on 9x64x64, about 0.5 M parameters) and `resnet18` (ResNet-18
    /// on 3x224x224, 11.2 M parameters), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "small,resnet18")]
    models: Vec<String>,
    /// Rounds per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Transports, comma-separated: `quic`, `tcp` (TLS over TCP, multiplexed).
    #[arg(long, value_delimiter = ',', default_value = "quic")]
    transport: Vec<String>,
    /// Each configuration also with secure aggregation (three or more centres), beside the plain round: the
    /// overhead as secure / plain.
    #[arg(long)]
    secure_aggregation: bool,
    /// The `fedslm` binary to run the server with (default: this one), to compare versions.
    #[arg(long)]
    server_program: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand, output: &super::Output) -> anyhow::Result<()> {
    // The servers and nodes of a benchmark log into a file of their own; the terminal gets the figures.
    let log = || std::env::temp_dir().join(format!("fedslm-bench-{}.log", std::process::id()));
    match cmd {
        BenchCommand::Rounds(args) => output.start(Some(&log())).and_then(|()| rounds(args)),
        BenchCommand::Flood(args) => output.start(Some(&log())).and_then(|()| flood_bench(args)),
        BenchCommand::Commit(args) => output.start(None).and_then(|()| commit(args)),
        BenchCommand::Dp(args) => output.start(None).and_then(|()| dp(args)),
        BenchCommand::Tradeoff(args) => output.start(None).and_then(|()| tradeoff(args)),
        BenchCommand::Spread(args) => output.start(None).and_then(|()| spread(args)),
        BenchCommand::Train(args) => {
            output.start(None)?;
            super::bench_train::run(args)
        }
    }
}

/// `fedslm bench rounds`.
fn rounds(args: RoundsArgs) -> anyhow::Result<()> {
    let transports = args
        .transport
        .iter()
        .map(|t| match t.as_str() {
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            other => Err(anyhow::anyhow!(
                "--transport {other:?}: expected quic or tcp"
            )),
        })
        .collect::<anyhow::Result<Vec<Transport>>>()?;
    println!(
        "model, parameters, MB, centres, transport, aggregation, s/round (median of {}), server peak \
         MiB, secure / plain, target s/round, target MiB, targets, QUIC alone s (median of {}), round / \
         QUIC alone",
        args.rounds, args.rounds
    );
    let program = match args.server_program {
        Some(p) => p,
        None => std::env::current_exe()?,
    };
    for model in &args.models {
        let network = bench_network(model)?;
        let weights = network.to_weights()?;
        for &n in &args.centers {
            // The transports side by side for each configuration, so that they meet the same machine load.
            for &transport in &transports {
                // Secure aggregation needs three centres in a sum.
                let secure_too = args.secure_aggregation && n >= 3;
                let mut plain = f64::NAN;
                for secure in [false, true] {
                    if secure && !secure_too {
                        continue;
                    }
                    let tmp = tempfile_dir()?;
                    let timing =
                        round_seconds(&program, &tmp, &network, n, args.rounds, transport, secure);
                    let _ = std::fs::remove_dir_all(&tmp);
                    let timing = timing?;
                    let ratio = if secure {
                        plain = timing.median_seconds / plain;
                        format!("{plain:.2}")
                    } else {
                        plain = timing.median_seconds;
                        "-".to_string()
                    };
                    // The targets are a plain round's.
                    let target = round_target(model, n).filter(|_| !secure);
                    let targets = match target {
                        Some((s, mib)) => format!(
                            "{}, {mib:.0}, {} / {}",
                            if s.is_finite() {
                                format!("{s:.1}")
                            } else {
                                "-".into()
                            },
                            verdict(timing.median_seconds, s),
                            verdict(timing.server_peak_mib, mib)
                        ),
                        None => "-, -, -".into(),
                    };
                    // The limit: the same bytes over the same QUIC and TLS, with no protocol at all, measured
                    // here, beside the round, so that both meet the same machine.
                    let alone = if transport == Transport::Quic && !secure {
                        let mut seconds = Vec::new();
                        for _ in 0..args.rounds.max(1) {
                            let tmp = tempfile_dir()?;
                            let s = echo_seconds(&tmp, n, weights.data_bytes());
                            let _ = std::fs::remove_dir_all(&tmp);
                            seconds.push(s?);
                        }
                        let median = median(seconds);
                        format!("{median:.3}, {:.2}", timing.median_seconds / median)
                    } else {
                        "-, -".into()
                    };
                    println!(
                        "{model}, {}, {:.1}, {n}, {transport}, {}, {:.3}, {:.0}, {ratio}, {targets}, \
                         {alone}",
                        network.parameter_count(),
                        weights.data_bytes() as f64 / 1e6,
                        if secure { "secure" } else { "plain" },
                        timing.median_seconds,
                        timing.server_peak_mib
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
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

/// `fedslm bench flood`.
fn flood_bench(args: FloodArgs) -> anyhow::Result<()> {
    let spec = FloodSpec {
        initials: args.initials,
        validated: args.validated,
        hostile: args.hostile,
        centres: args.centers,
    };
    let tmp = tempfile_dir()?;
    let program = match args.server_program {
        Some(p) => p,
        None => std::env::current_exe()?,
    };
    let bar = super::console::console().add(super::progress::phases_bar(6));
    let phases = flood(&program, &tmp, spec, |name| {
        bar.inc(1);
        bar.set_message(name.to_string())
    });
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "| phase | s | server RSS before (MiB) | peak | after | honest rounds | rounds/s | answered: Retry / handshake / refused |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    for p in phases? {
        let answers = p.answers.map_or("".into(), |a| {
            format!("{} / {} / {}", a.retry, a.handshake, a.refused)
        });
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {answers} |",
            p.name,
            p.seconds,
            p.rss_before_mib,
            p.rss_peak_mib,
            p.rss_after_mib,
            p.rounds,
            p.rounds as f64 / p.seconds
        );
    }
    Ok(())
}

/// `fedslm bench commit`.
fn commit(args: CommitArgs) -> anyhow::Result<()> {
    if args.dir.exists() {
        bail!(
            "{} exists; name a folder the benchmark may create and remove",
            args.dir.display()
        );
    }
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir)?;
    let network = bench_network("resnet18")?;
    let weights = network.to_weights()?;
    let card = network.card(Default::default(), Default::default());
    let mb = weights.data_bytes() as f64 / 1e6;
    println!(
        "commit of a {mb:.1} MB model (ResNet-18, {} parameters), {} rounds, store on {} ({})",
        network.parameter_count(),
        args.rounds,
        filesystem_of(&dir),
        dir.join("out").display()
    );
    let phases = commit_phases(&dir, &weights, &card, args.rounds);
    let _ = std::fs::remove_dir_all(&dir);
    let mut p = phases?;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2] * 1e3, v[v.len() - 1] * 1e3)
    };
    println!("phase, median ms, max ms");
    for (name, v) in [
        ("checkpoint written (safetensors, fsynced)", &mut p.write),
        (
            "hashed (SHA-256), fsynced, renamed, folder fsynced",
            &mut p.durable,
        ),
        (
            "sled record + audit entry flushed, status files, head signed",
            &mut p.record,
        ),
        ("commit, all of it", &mut p.total),
        (
            "baseline: the same file written without fsync or record",
            &mut p.baseline,
        ),
        ("of which SHA-256 of the file alone", &mut p.hash),
    ] {
        let (m, x) = med(v);
        println!("{name}, {m:.1}, {x:.1}");
    }
    let ratio = med(&mut p.total).0 / med(&mut p.baseline).0;
    println!(
        "commit / baseline: {ratio:.2} (median); commit throughput {:.0} MB/s",
        mb / (med(&mut p.total).0 / 1e3)
    );
    Ok(())
}

fn dp(args: DpArgs) -> anyhow::Result<()> {
    use fedslm_study::bench::dp::time_dp;
    use fedslm_study::bench::train::bench_net;
    println!(
        "CPU: {}; threads: {}",
        fedslm_study::simulate::spread::cpu_model(),
        fedslm_model::kernels::threads()
    );
    println!("| network | batch | plain step (ms) | DP-SGD step (ms) | DP / plain |");
    println!("| --- | --- | --- | --- | --- |");
    let mut rng = fedslm_cohort::Rng::new(1);
    for a in &args.arch {
        let net = bench_net(a)?;
        let t = time_dp(&net, args.batch, args.warmup, args.steps, &mut rng)?;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |",
            net.label,
            t.batch,
            t.plain,
            t.private,
            t.ratio()
        );
    }
    Ok(())
}

fn spread(args: SpreadArgs) -> anyhow::Result<()> {
    let results = fedslm_study::simulate::spread::read(&args.run)?;
    print!("{}", fedslm_study::simulate::report::spread_table(&results));
    for path in fedslm_study::figures::write_spread(&args.figures, &results)? {
        println!("figure: {}", path.display());
    }
    Ok(())
}

fn tradeoff(args: TradeoffArgs) -> anyhow::Result<()> {
    use fedslm_study::simulate::tradeoff::{read_points, spreads, table_md};
    let points = read_points(&args.runs)?;
    print!("{}", table_md(&spreads(&points)));
    for path in fedslm_study::figures::write_tradeoff(&args.figures, &points)? {
        println!("figure: {}", path.display());
    }
    Ok(())
}
