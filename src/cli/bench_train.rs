//! `fedslm bench train`: the single source of truth for training speed. Times the forward pass (with the
//! loss), the backward pass, the optimiser step, the whole step and inference of our networks through the
//! client's own training path (`model::Trainer`, what `Network::fit` runs; `Network::predict`), one process
//! per kernel set (ours, candle's own ops as the before), and the identical network in PyTorch
//! (`tools/bench_torch.py`, compiled in) side by side on the same threads when PyTorch is installed. Prints a
//! Markdown table of medians and each process's peak RSS.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use fedslm_cohort::Rng;
use fedslm_study::bench::train::{
    bench_net, kernel_set, median, time_training, BenchNet, Timing, PHASES,
};

const TORCH_SCRIPT: &str = include_str!("../../tools/bench_torch.py");

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Networks, comma-separated: `default` (the default run's combined network: ResNet-10 of width 8, compact
    /// stem, 9 x 64 x 64), `small` (the same on 3 x 32 x 32), `resnet18` (the study's scale: ResNet-18 of width
    /// 64, torchvision's stem, 3 x 224 x 224, combined).
    #[arg(long, value_delimiter = ',', default_value = "default,resnet18")]
    arch: Vec<String>,
    /// Threads on both sides (ours: RAYON_NUM_THREADS; PyTorch: torch.set_num_threads). Default: candle's
    /// default, the physical cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed steps per network, after the warm-up; default 20, and 5 for resnet18.
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Kernel sets, comma-separated: `fedslm` (ours, what the client runs) and `candle` (candle's own ops, the
    /// reference and the before).
    #[arg(long, value_delimiter = ',', default_value = "fedslm,candle")]
    kernels: Vec<String>,
    /// Times each process is run, in turn with the others; figures are medians over these rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The Python interpreter with PyTorch for the side-by-side run; `none` skips it.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Measure in this process and print JSON lines (the parent starts one such process per kernel set).
    #[arg(long, hide = true)]
    worker: bool,
}

fn nets(args: &TrainBenchArgs) -> anyhow::Result<Vec<BenchNet>> {
    args.arch
        .iter()
        .map(|a| {
            let mut net = bench_net(a)?;
            net.steps = args.steps.unwrap_or(net.steps);
            Ok(net)
        })
        .collect()
}

/// Measures in this process, one JSON line per network.
fn worker(args: &TrainBenchArgs) -> anyhow::Result<()> {
    let [set] = args.kernels.as_slice() else {
        bail!("a worker measures one kernel set");
    };
    let set = kernel_set(set)?;
    let mut rng = Rng::new(1);
    for net in nets(args)? {
        let timing = time_training(&net, set, args.batch, args.warmup, net.steps, &mut rng)?;
        println!("{}", serde_json::to_string(&timing)?);
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Runs `cmd` and reads one JSON timing per line of its output, ticking `bar` for each.
fn collect(
    cmd: &mut Command,
    what: &str,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Timing>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut out = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let t: Timing = serde_json::from_str(&line)
            .with_context(|| format!("{what} printed {line:?}, not a timing"))?;
        bar.inc(1);
        out.push(t);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(out)
}

/// The PyTorch version, or why there is none.
fn torch_version(python: &str) -> Result<String, String> {
    if python == "none" {
        return Err("--python none".into());
    }
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{python} cannot import torch"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run(args: TrainBenchArgs) -> anyhow::Result<()> {
    if args.worker {
        return worker(&args);
    }
    let nets = nets(&args)?;
    for k in &args.kernels {
        kernel_set(k)?;
    }
    let threads = args
        .threads
        .unwrap_or_else(fedslm_model::kernels::threads)
        .max(1);
    let torch = torch_version(&args.python);
    let script = std::env::temp_dir().join(format!("fedslm-bench-torch-{}.py", std::process::id()));
    if torch.is_ok() {
        std::fs::write(&script, TORCH_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
    }
    let result = measure(&args, threads, &nets, torch.is_ok(), &script);
    let _ = std::fs::remove_file(&script);
    let columns = result?;
    print_table(&args, threads, &nets, &columns, &torch);
    Ok(())
}

/// Runs every process `--rounds` times, in turn (our kernel sets, then PyTorch), so that a change in the
/// machine's load falls on all of them alike; each figure is the median over rounds of the processes' medians.
fn measure(
    args: &TrainBenchArgs,
    threads: usize,
    nets: &[BenchNet],
    torch: bool,
    script: &std::path::Path,
) -> anyhow::Result<Vec<(String, Vec<Timing>)>> {
    let exe = std::env::current_exe()?;
    let arch = nets.iter().map(|n| n.name).collect::<Vec<_>>().join(",");
    let mut jobs: Vec<(String, Vec<Command>)> = Vec::new();
    for k in &args.kernels {
        let mut cmd = Command::new(&exe);
        cmd.env("RAYON_NUM_THREADS", threads.to_string())
            .args([
                "bench",
                "train",
                "--worker",
                "--kernels",
                k,
                "--arch",
                &arch,
            ])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--batch", &args.batch.to_string()]);
        if let Some(s) = args.steps {
            cmd.args(["--steps", &s.to_string()]);
        }
        if k == "candle" {
            // candle's ops on its own pool of the same size, as they ran before our kernels.
            cmd.env("CANDLE_NUM_THREADS", threads.to_string());
        }
        jobs.push((k.clone(), vec![cmd]));
    }
    if torch {
        // One process per network: each its own step count and peak RSS.
        let cmds = nets
            .iter()
            .map(|net| {
                let c = &net.config;
                let stem = match c.stem {
                    fedslm_model::Stem::Compact => "compact",
                    fedslm_model::Stem::Standard => "standard",
                };
                let spec = format!(
                    "{}:{}:{}:{}:{}:{stem}:{}",
                    net.name, c.in_channels, c.input_size, c.width, c.depth, c.clinical_features
                );
                let mut cmd = Command::new(&args.python);
                cmd.arg(script)
                    .args(["--threads", &threads.to_string()])
                    .args(["--steps", &net.steps.to_string()])
                    .args(["--warmup", &args.warmup.to_string()])
                    .args(["--batch", &args.batch.to_string()])
                    .arg(spec);
                cmd
            })
            .collect();
        jobs.push(("PyTorch".into(), cmds));
    }
    let rounds = args.rounds.max(1);
    let bar = super::console::console().add(super::progress::timings_bar(
        (rounds * jobs.len() * nets.len()) as u64,
    ));
    let mut runs: Vec<Vec<Timing>> = vec![Vec::new(); jobs.len()];
    for _ in 0..rounds {
        for ((name, cmds), out) in jobs.iter_mut().zip(&mut runs) {
            for cmd in cmds {
                let what = if name == "PyTorch" {
                    "the PyTorch script".to_string()
                } else {
                    format!("the {name} worker")
                };
                out.extend(collect(cmd, &what, &bar)?);
            }
        }
    }
    bar.finish_and_clear();
    let median_of = |timings: &[Timing], name: &str| -> Option<Timing> {
        let of: Vec<&Timing> = timings.iter().filter(|t| t.name == name).collect();
        let m = |f: fn(&Timing) -> f64| median(of.iter().map(|t| f(t)).collect());
        (!of.is_empty()).then(|| Timing {
            name: name.into(),
            forward: m(|t| t.forward),
            backward: m(|t| t.backward),
            optimiser: m(|t| t.optimiser),
            step: m(|t| t.step),
            inference: m(|t| t.inference),
            peak_rss_mib: m(|t| t.peak_rss_mib),
        })
    };
    Ok(jobs
        .iter()
        .zip(&runs)
        .map(|((name, _), timings)| {
            let per_net = nets
                .iter()
                .filter_map(|n| median_of(timings, n.name))
                .collect();
            (name.clone(), per_net)
        })
        .collect())
}

fn print_table(
    args: &TrainBenchArgs,
    threads: usize,
    nets: &[BenchNet],
    columns: &[(String, Vec<Timing>)],
    torch: &Result<String, String>,
) {
    match torch {
        Ok(v) => println!("PyTorch {v} ({}), ", args.python),
        Err(why) => println!("PyTorch not run ({why}): no ratios. "),
    }
    println!(
        "{threads} thread{}, batch {}; each process run {} times in turn with the others; in ms, the median \
         over those runs of each run's median over its timed steps (after {} warm-up steps); peak RSS of each \
         process in MiB\n",
        if threads == 1 { "" } else { "s" },
        args.batch,
        args.rounds.max(1),
        args.warmup
    );
    let has_torch = columns.iter().any(|(n, _)| n == "PyTorch");
    let ours: Vec<&(String, Vec<Timing>)> =
        columns.iter().filter(|(n, _)| n != "PyTorch").collect();
    let mut header = vec!["network".to_string(), "threads".into(), "phase".into()];
    header.extend(columns.iter().map(|(n, _)| format!("{n} ms")));
    if has_torch {
        header.extend(ours.iter().map(|(n, _)| format!("{n} / PyTorch")));
    }
    println!("| {} |", header.join(" | "));
    println!("|{}", " --- |".repeat(header.len()));
    let find =
        |col: &(String, Vec<Timing>), name: &str| col.1.iter().find(|t| t.name == name).cloned();
    for net in nets {
        let label = format!("{} ({} steps)", net.label, net.steps);
        for (i, phase) in PHASES.iter().enumerate().chain([(5, &"peak RSS MiB")]) {
            let value = |t: &Timing| if i == 5 { t.peak_rss_mib } else { t.phase(i) };
            let mut row = vec![
                if i == 0 { label.clone() } else { String::new() },
                if i == 0 {
                    threads.to_string()
                } else {
                    String::new()
                },
                phase.to_string(),
            ];
            let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            row.extend(
                columns
                    .iter()
                    .map(|c| cell(find(c, net.name).map(|t| value(&t)))),
            );
            if has_torch {
                let torch = columns
                    .iter()
                    .find(|(n, _)| n == "PyTorch")
                    .and_then(|c| find(c, net.name));
                for col in &ours {
                    let ratio = match (find(col, net.name), &torch) {
                        (Some(a), Some(b)) => format!("{:.2}", value(&a) / value(b)),
                        _ => "-".into(),
                    };
                    row.push(ratio);
                }
            }
            println!("| {} |", row.join(" | "));
        }
    }
    if has_torch {
        print_targets(nets, &ours, columns, &find);
    }
}

/// A column of the table: a kernel set (or PyTorch) and its timings.
type Column = (String, Vec<Timing>);

/// Each network's training step and inference against issue 24's target: at most PyTorch's time.
fn print_targets(
    nets: &[BenchNet],
    ours: &[&Column],
    columns: &[Column],
    find: &dyn Fn(&Column, &str) -> Option<Timing>,
) {
    let target = fedslm_study::bench::TORCH_RATIO_TARGET;
    println!("\n| network | phase | kernels | ours / PyTorch | target | |\n| --- | --- | --- | --- | --- | --- |");
    let torch = columns.iter().find(|(n, _)| n == "PyTorch");
    for net in nets {
        let Some(t) = torch.and_then(|c| find(c, net.name)) else {
            continue;
        };
        for (i, phase) in PHASES.iter().enumerate().filter(|(i, _)| *i >= 3) {
            for col in ours {
                if let Some(a) = find(col, net.name) {
                    let ratio = a.phase(i) / t.phase(i);
                    println!(
                        "| {} | {phase} | {} | {ratio:.2} | <= {target:.2} | {} |",
                        net.label,
                        col.0,
                        fedslm_study::bench::verdict(ratio, target)
                    );
                }
            }
        }
    }
}
