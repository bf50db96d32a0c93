//! `fedslm train`: centralised training on one or several centres pooled (`fedslm_study::centralised`), the
//! baseline federated results are compared against.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use fedslm_model::{Augmentation, ModelKind, Optimizer, TrainConfig};
use fedslm_study::centralised::{train, TrainProgress, TrainSpec};
use fedslm_study::{Arch, NetSpec};

/// The settings that decide what a network looks like and what it is fed.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// compact (ResNet-10 of width 8, a 3x3 stride-2 stem: the default, sized for a 2-core CPU), resnet10,
    /// resnet18 (the study's network) or resnet34 (width 64, torchvision's stem).
    #[arg(long, default_value = "compact", value_parser = arch())]
    arch: Arch,
    /// Channels of the first stage (default: 8 for compact, 64 otherwise).
    #[arg(long)]
    width: Option<usize>,
    /// The study's scale: ResNet-18 on 224 x 224 crops of the largest ROI slice (3 channels). Overrides --arch
    /// and the preprocessing's size and neighbours.
    #[arg(long)]
    study_scale: bool,
    /// A centre's client.toml, for its clinical coding and preprocessing (default: the study's).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn arch() -> impl clap::builder::TypedValueParser<Value = Arch> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Arch::ALL.map(Arch::name))
        .try_map(|name| name.parse::<Arch>())
}

impl NetArgs {
    pub fn spec(&self) -> NetSpec {
        NetSpec {
            arch: self.arch,
            width: self.width,
            study_scale: self.study_scale,
            settings_from: self.config.clone(),
            ..NetSpec::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

/// How image networks are trained.
#[derive(Debug, Args)]
pub struct FitArgs {
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (cosine schedule).
    #[arg(long, default_value_t = 5e-3)]
    learning_rate: f64,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerName,
    /// SGD's momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// Weight of positive patients' loss (for example negatives / positives); default 1.
    #[arg(long)]
    pos_weight: Option<f64>,
    /// Train on the crops as they are (no flips, rotations, shifts or intensity jitter).
    #[arg(long)]
    no_augment: bool,
}

impl FitArgs {
    pub fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: match self.optimizer {
                OptimizerName::Adamw => Optimizer::AdamW {
                    weight_decay: self.weight_decay,
                },
                OptimizerName::Sgd => Optimizer::Sgd {
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                },
            },
            pos_weight: self.pos_weight,
            augmentation: (!self.no_augment).then(Augmentation::default),
            proximal_mu: None,
            seed,
            dp: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A cohort folder: one centre (with manifest.csv) or several (sub-folders with manifest.csv), pooled.
    #[arg(long)]
    cohort: PathBuf,
    #[arg(long, value_parser = super::model_kind())]
    model: ModelKind,
    /// Only these centres of the cohort, comma-separated.
    #[arg(long, value_delimiter = ',')]
    centers: Vec<String>,
    /// Cross-validation folds (stratified); 0 or 1 skips cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Seed of the folds, the initial weights, batches and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Folder for the model file (<model>.safetensors) and the out-of-fold predictions
    /// (<model>-cv-predictions.csv).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Folder for the preprocessing cache (crops keyed by file contents and settings).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The combined network: start its head at the clinical logistic model fitted on the same training
    /// patients (as `fedslm model init --clinical` does for a federation).
    #[arg(long)]
    head_from_clinical: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    fit: FitArgs,
}

pub fn run(args: TrainArgs, output: &super::Output) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("cannot make {}: {e}", args.out.display()))?;
    let log = args.out.join(fedslm_study::simulate::LOG_FILE);
    output.start(Some(&log))?;
    let console = super::console::console();
    let spec = TrainSpec {
        cohort: args.cohort,
        model: args.model,
        centers: args.centers,
        folds: args.folds,
        seed: args.seed,
        out: args.out,
        cache: args.cache,
        head_from_clinical: args.head_from_clinical,
        net: args.net.spec(),
        train: args.fit.config(args.seed),
    };
    let bar = console.add(super::progress::epochs_bar());
    let trained = train(&spec, &mut |p| match p {
        TrainProgress::Planned { fits, epochs } => bar.set_length((fits * epochs) as u64),
        TrainProgress::Fitting { what } => bar.set_message(what.to_string()),
        TrainProgress::Epoch => bar.inc(1),
        TrainProgress::HeadStartsPlain { what, why } => console.milestone(&format!(
            "{what}: the head starts plain: the clinical model: {why}"
        )),
    })?;
    bar.finish_and_clear();
    println!(
        "{} on {} patients ({} with SLM) from {}",
        trained.description,
        trained.patients,
        trained.positives,
        trained.centers.join(", ")
    );
    if let Some(fit) = &trained.clinical_fit {
        print_table(fit);
    }
    if let Some((cv, path, _, _)) = &trained.cross_validation {
        println!(
            "cross-validation, {} stratified folds (seed {}): out-of-fold {}\nout-of-fold predictions: {}",
            cv.folds,
            cv.seed,
            cv.out_of_fold,
            path.display()
        );
    }
    println!("model: {}", trained.model.display());
    super::console::console().milestone(&format!("log: {}", log.display()));
    Ok(())
}

pub fn print_table(fit: &fedslm_metrics::LogisticFit) {
    println!(
        "\n{:<12} {:>8} {:>8} {:>8} {:>17} {:>8}",
        "covariate", "beta", "SE", "OR", "OR 95% CI", "p"
    );
    for (i, name) in fit.names.iter().enumerate() {
        let (lo, hi) = fit.odds_ratio_ci95(i);
        let p = if fit.p[i] < 0.001 {
            "<0.001".to_string()
        } else {
            format!("{:.3}", fit.p[i])
        };
        println!(
            "{name:<12} {:>8.3} {:>8.3} {:>8.3} {:>8.3}-{:<8.3} {p:>8}",
            fit.coefficients[i],
            fit.std_errors[i],
            fit.odds_ratio(i),
            lo,
            hi
        );
    }
    println!("log-likelihood {:.4}", fit.log_likelihood);
}
