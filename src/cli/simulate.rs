//! `fedslm simulate`: the study, federated, on this machine (`fedslm_study::simulate`); this command parses
//! its settings, draws its progress and prints its table.

use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use fedslm_model::ModelKind;
use fedslm_study::centralised::TrainProgress;
use fedslm_study::simulate::spread::Repeats;
use fedslm_study::simulate::{self, report, Holdout, Settings, ShiftMethods, StudyEvent};
use indicatif::ProgressBar;

use super::console::console;
use super::progress;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A multi-centre cohort (one folder per centre with its manifest.csv); default: write the `study`
    /// synthetic cohort into the output folder.
    #[arg(long)]
    cohort: Option<PathBuf>,
    /// A new (or empty) folder for everything the run writes.
    #[arg(long, default_value = "simulation")]
    out: PathBuf,
    /// Models to federate; combined brings clinical with it (its head starts at the clinical fit).
    #[arg(
        long,
        value_parser = super::model_kind(),
        value_delimiter = ',',
        default_value = "clinical,mri,combined"
    )]
    models: Vec<ModelKind>,
    /// Cross-validation folds (each a federation); 0: no cross-validation (no internal estimate).
    #[arg(long, default_value_t = 5)]
    folds: u32,
    /// Rounds of each network's federation (the clinical model runs federated Newton to convergence).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Local epochs per round at each training centre.
    #[arg(long, default_value_t = 3)]
    local_epochs: u32,
    /// The centre held out for external validation, or `none`; default: `external` if there is one.
    #[arg(long)]
    holdout: Option<String>,
    /// Bins of the score histograms the centres send [default: 1000; 10 with --dp-epsilon, whose noise is
    /// per bin].
    #[arg(long)]
    bins: Option<u32>,
    /// The synthetic cohort's seed, and the training seed (initial weights, folds, batches, augmentation).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run the whole study this many times, with training seeds --seed, --seed + 1, ..., on the same cohort,
    /// and report each figure's median and range (each repeat kept in its own folder).
    #[arg(long, conflicts_with = "seeds")]
    repeats: Option<usize>,
    /// Repeats with these training seeds (on the cohort of --seed, or of each of --cohort-seeds).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Repeats on these synthetic cohorts too (each with every training seed).
    #[arg(long, value_delimiter = ',')]
    cohort_seeds: Option<Vec<u64>>,
    /// Skip the centralised baseline (`fedslm train` on the training centres pooled, same folds and epochs).
    #[arg(long)]
    no_centralised: bool,
    /// Every site under patient-level differential privacy with this ε per federation (δ = 1e-5): DP-SGD,
    /// noised Newton statistics and histograms, each site's ledger enforcing the budget.
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// Secure aggregation (Bonawitz et al. 2017) in every federation: the server learns only sums of three
    /// or more centres, never one training centre's update, statistics or evaluation.
    #[arg(long)]
    secure_aggregation: bool,
    /// Methods against scanner shift: `none`, or any of augment (scanner-style augmentation in training),
    /// adabn (batch-norm statistics recomputed at each validating centre from its own images), fedbn (batch
    /// norm kept at each training centre), standardise (Nyúl-Udupa intensity standardisation onto a scale
    /// the training centres agree in a landmarks round first) [default: the methods chosen on development
    /// cohorts, smoothing at 3 mm; naming methods here replaces them, smoothing included].
    #[arg(long, value_delimiter = ',')]
    shift: Option<Vec<String>>,
    /// With augment: the scanner-style ranges from this TOML file (the keys of client.toml's
    /// `[augmentation.scanner]`: max_blur, max_bias, max_gamma, max_noise, max_noise_grain).
    #[arg(long)]
    scanner_style: Option<PathBuf>,
    /// Resolution harmonisation: every sequence smoothed in-plane by a Gaussian of this standard deviation
    /// (mm) before cropping, at every centre; 0: none [default: 3 without --shift, 0 with it].
    #[arg(long)]
    smooth_mm: Option<f64>,
    /// Crops of this fixed side (mm) around each ROI instead of the ROI's box, at every centre.
    #[arg(long)]
    fov_mm: Option<f64>,
}

impl SimulateArgs {
    /// The repeats asked for, if any.
    fn repeats(&self) -> Option<Repeats> {
        if self.repeats.is_none() && self.seeds.is_none() && self.cohort_seeds.is_none() {
            return None;
        }
        let training_seeds = match (&self.seeds, self.repeats) {
            (Some(s), _) => s.clone(),
            (None, Some(n)) => Repeats::consecutive(self.seed, n).training_seeds,
            (None, None) => vec![self.seed],
        };
        Some(Repeats {
            cohort_seeds: self.cohort_seeds.clone().unwrap_or(vec![self.seed]),
            training_seeds,
        })
    }

    fn settings(self) -> anyhow::Result<Settings> {
        let mut shift = match &self.shift {
            Some(names) => ShiftMethods::parse(names)?,
            None => ShiftMethods::DEFAULT,
        };
        if let Some(path) = &self.scanner_style {
            shift = shift.with_scanner_style(path)?;
        }
        // Their ranges are checked with the other settings (`Settings::check`).
        shift.smooth_mm = self.smooth_mm.unwrap_or(shift.smooth_mm);
        shift.fov_mm = self.fov_mm.unwrap_or(shift.fov_mm);
        Ok(Settings {
            cohort: self.cohort,
            out: self.out,
            models: self.models,
            folds: self.folds,
            rounds: self.rounds,
            local_epochs: self.local_epochs,
            holdout: match self.holdout.as_deref() {
                None => Holdout::Default,
                Some("none") => Holdout::None,
                Some(c) => Holdout::Center(c.to_string()),
            },
            bins: self.bins.unwrap_or(match self.dp_epsilon {
                Some(_) => fedslm_study::simulate::privacy::DP_BINS,
                None => 1000,
            }),
            seed: self.seed,
            training_seed: None,
            centralised: !self.no_centralised,
            dp_epsilon: self.dp_epsilon,
            secure_aggregation: self.secure_aggregation,
            shift,
        })
    }
}

pub fn run(args: SimulateArgs, output: &super::Output) -> anyhow::Result<()> {
    // Settings that cannot work are refused before anything is written.
    let repeats = args.repeats();
    let settings = args.settings()?;
    settings.check()?;
    if let Some(r) = &repeats {
        r.check(&settings)?;
    }
    let out = simulate::prepare_out(&settings.out)?;
    let log = out.join(simulate::LOG_FILE);
    output.start(Some(&log))?;
    let console = console();
    // One bar for the cohort's patients or a federation's rounds, and one for the centralised baselines'
    // epochs, which train alongside the federations.
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let with_bar = |f: &dyn Fn(&mut Option<ProgressBar>)| {
        f(&mut bar.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let central_bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let with_central_bar = |f: &dyn Fn(&mut Option<ProgressBar>)| {
        f(&mut central_bar.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let observer = |event: StudyEvent<'_>| match event {
        StudyEvent::Milestone(line) => console.milestone(&line),
        StudyEvent::WritingCohort { done, total } => with_bar(&|b| {
            let b = b.get_or_insert_with(|| {
                let b = console.add(progress::patients_bar(total as u64));
                b.set_message("writing NIfTI");
                b
            });
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }),
        StudyEvent::FederationStarted { label, rounds } => with_bar(&|b| {
            if let Some(old) = b.replace(console.add(progress::rounds_bar(label, rounds))) {
                old.finish_and_clear();
            }
        }),
        StudyEvent::RoundCommitted { round, summary, .. } => with_bar(&|b| {
            if let Some(b) = b {
                b.set_position(u64::from(round));
                b.set_message(summary.clone());
            }
        }),
        StudyEvent::FederationEnded { .. } => with_bar(&|b| {
            if let Some(old) = b.take() {
                old.finish_and_clear();
            }
        }),
        StudyEvent::Centralised { progress: p, .. } => with_central_bar(&|b| match &p {
            TrainProgress::Planned { fits, epochs } => {
                let bar = console.add(progress::epochs_bar());
                bar.set_length((fits * epochs) as u64);
                if let Some(old) = b.replace(bar) {
                    old.finish_and_clear();
                }
            }
            TrainProgress::Fitting { what } => {
                if let Some(b) = b {
                    b.set_message(what.to_string());
                }
            }
            TrainProgress::Epoch => {
                if let Some(b) = b {
                    b.inc(1);
                }
            }
            TrainProgress::HeadStartsPlain { what, why } => console.milestone(&format!(
                "{what}: the head starts plain: the clinical model: {why}"
            )),
        }),
    };
    let settings = Settings {
        out: out.clone(),
        ..settings
    };
    let finish_bar = || {
        for slot in [&bar, &central_bar] {
            if let Some(b) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                b.finish_and_clear();
            }
        }
    };
    if let Some(repeats) = repeats {
        let results = simulate::spread::run_repeats(settings, &repeats, &observer);
        finish_bar();
        let results = results?;
        console.result(&format!("\n{}", report::spread_table(&results)));
        console.milestone(&format!(
            "wall time {:.0} s ({:.0} s a repeat); results.json, report.md and figures/spread.png in {}, each \
             repeat in its own folder",
            results.wall_seconds,
            results.wall_seconds / results.repeats.len().max(1) as f64,
            out.display()
        ));
    } else {
        let results = simulate::run(settings, &observer);
        finish_bar();
        let results = results?;
        console.result(&format!("\n{}", report::table(&results)));
        console.milestone(&format!(
            "wall time {:.0} s, peak memory {:.0} MiB; results.json, report.md and figures/ in {}",
            results.wall_seconds,
            results.peak_memory_mib,
            out.display()
        ));
        console.milestone(&format!("time by phase: {}", results.phases_line()));
    }
    console.milestone(&format!(
        "every line the servers and nodes logged: {}",
        log.display()
    ));
    Ok(())
}
