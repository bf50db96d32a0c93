//! `fedslm synth`: a synthetic multi-centre cohort on disk.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fedslm_cohort::synth::{write_cohort, Geometry, Plan, Preset};
use fedslm_cohort::Partitioner;

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to write: one sub-folder per centre with manifest.csv and NIfTI images, and synth.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// study (176 + 31 patients, as the paper), tiny (for tests), large (about 2,000).
    #[arg(long, default_value = "study")]
    preset: Preset,
    /// Without --partition: the centres to write, comma-separated (default all). With it: how many virtual
    /// centres to split the training centres into.
    #[arg(long)]
    centers: Option<String>,
    /// Split the training centres' patients into virtual centres: iid, dirichlet:ALPHA (label skew) or
    /// quantity:ALPHA (size skew). The external centre stays as it is.
    #[arg(long)]
    partition: Option<Partitioner>,
}

pub fn run(args: SynthArgs, output: &super::Output) -> anyhow::Result<()> {
    if args.out.join("synth.json").exists() {
        bail!(
            "{} already holds a synthetic cohort; choose another --out",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot make {}", args.out.display()))?;
    let log = args.out.join(fedslm_study::simulate::LOG_FILE);
    output.start(Some(&log))?;
    let centers = args.preset.centers();
    let plan = match (&args.partition, &args.centers) {
        (Some(how), count) => {
            let k = match count {
                None => 8,
                Some(c) => c
                    .parse::<usize>()
                    .ok()
                    .filter(|k| *k >= 1)
                    .with_context(|| {
                        format!(
                            "--centers {c:?}: with --partition, give the number of virtual centres"
                        )
                    })?,
            };
            Plan::partitioned(args.seed, &centers, k, *how)
        }
        (None, Some(names)) => {
            let wanted: Vec<&str> = names.split(',').map(str::trim).collect();
            for w in &wanted {
                if !centers.iter().any(|c| c.name == *w) {
                    let known: Vec<&str> = centers.iter().map(|c| c.name.as_str()).collect();
                    bail!(
                        "--centers: no centre {w:?} in this preset; it has {}",
                        known.join(", ")
                    );
                }
            }
            let mut plan = Plan::natural(&centers);
            plan.groups
                .retain(|(name, _)| wanted.contains(&name.as_str()));
            plan
        }
        (None, None) => Plan::natural(&centers),
    };
    let total: usize = plan.groups.iter().map(|g| g.1.len()).sum();
    let bar = super::console::console().add(super::progress::patients_bar(total as u64));
    bar.set_message("writing NIfTI");
    let report = write_cohort(
        &args.out,
        args.seed,
        &centers,
        &plan,
        &Geometry::standard(),
        &|n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    println!(
        "synthetic cohort, seed {}: {}",
        args.seed,
        args.out.display()
    );
    print!("{}", report.table());
    super::console::console().milestone(&format!("log: {}", log.display()));
    Ok(())
}
