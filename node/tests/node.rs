//! The node library on a real centre's manifest (`shared/reference/clinical/center-a`, 80 patients with
//! clinical data only): its folds split its patients between training and evaluation, its kept scores pair
//! by patient, and it refuses what a paired test cannot use.

use std::path::{Path, PathBuf};

use fedslm_client::ClientConfig;
use fedslm_model::clinical;
use fedslm_node::{Node, NodeError, PlacementError};
use fedslm_protocol::{
    DpSgd, EvaluateTask, FitTask, Fold, LocalObjective, ModelKind, PlacementTask, Weights,
};

fn center() -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE")).join("clinical/center-a")
}

fn node(scores: Option<&Path>) -> Node {
    node_with(scores, "")
}

/// A node whose client.toml ends with `extra` (a `[privacy]` table, say).
fn node_with(scores: Option<&Path>, extra: &str) -> Node {
    let mut text = format!(
        "center = \"center-a\"\nserver = \"127.0.0.1:9\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
         cohort = {:?}\n",
        center().display().to_string()
    );
    if let Some(dir) = scores {
        text += &format!("scores = {:?}\n", dir.display().to_string());
    }
    text += extra;
    let config = ClientConfig::parse(&text, Path::new("/nowhere/client.toml")).unwrap();
    Node::load(&config).unwrap()
}

fn clinical_model(beta: &[f64]) -> Weights {
    clinical::to_weights(beta, &vec![0.0; beta.len() * beta.len()]).unwrap()
}

fn evaluation(weights: &Weights, fold: Option<Fold>) -> EvaluateTask {
    EvaluateTask {
        round: 1,
        model: ModelKind::Clinical,
        weights: weights.clone(),
        fold,
        histogram_bins: 100,
        histogram_noise: None,
        adapt_batch_norm: false,
    }
}

fn newton(weights: &Weights, fold: Option<Fold>, dp: Option<DpSgd>) -> FitTask {
    FitTask {
        round: 1,
        model: ModelKind::Clinical,
        weights: weights.clone(),
        local_epochs: 1,
        learning_rate: 0.0,
        batch_size: 1,
        fold,
        seed: 0,
        objective: LocalObjective::NewtonStep,
        keep_batch_norm_local: false,
        dp,
    }
}

#[test]
fn each_fold_is_evaluated_by_the_patients_its_training_leaves_out() {
    let mut node = node(None);
    let labelled = node.counts().patients;
    let p = clinical::names().len();
    let zero = clinical_model(&vec![0.0; p]);
    let mut evaluated = 0;
    for index in 0..5 {
        let fold = Fold::new(index, 5, 42);
        let report = node.evaluate("cv", &evaluation(&zero, fold)).unwrap();
        let fit = node.fit("cv", &newton(&zero, fold, None)).unwrap();
        assert_eq!(report.examples + fit.examples, labelled, "fold {index}");
        assert!((15..=17).contains(&report.examples), "{}", report.examples);
        evaluated += report.examples;
    }
    assert_eq!(evaluated, labelled);
}

#[test]
fn kept_scores_pair_by_patient_in_memory_and_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = node(Some(tmp.path()));
    let p = clinical::names().len();
    let a = clinical_model(&vec![0.0; p]);
    let mut beta = vec![0.1; p];
    beta[0] = -1.0;
    let b = clinical_model(&beta);
    let ha = first.evaluate("run-a", &evaluation(&a, None)).unwrap();
    let hb = first.evaluate("run-b", &evaluation(&b, None)).unwrap();
    let task = PlacementTask {
        a_runs: vec!["run-a".into()],
        b_runs: vec!["run-b".into()],
        pooled_a: ha.histogram.clone(),
        pooled_b: hb.histogram.clone(),
    };
    let in_memory = first.placements(&task).unwrap();
    assert_eq!(
        in_memory.n_positive + in_memory.n_negative,
        first.counts().patients
    );
    assert_eq!(in_memory.n_positive, ha.positives);
    // A model that scores everyone alike places each patient at one half of the other class.
    assert!((in_memory.positive[0] - 0.5 * in_memory.n_positive as f64).abs() < 1e-9);

    // A new process finds the same scores on the site's disk.
    let second = node(Some(tmp.path()));
    assert_eq!(second.placements(&task).unwrap(), in_memory);

    // A run this node never evaluated, and runs of other patients, are refused by name.
    let unknown = PlacementTask {
        a_runs: vec!["never".into()],
        ..task.clone()
    };
    let e = node(None).placements(&unknown).unwrap_err();
    assert!(
        matches!(&e, NodeError::Placement(PlacementError::NoRun { side: "A", run }) if run == "never"),
        "{e}"
    );
    first
        .evaluate("fold-1", &evaluation(&a, Fold::new(0, 5, 42)))
        .unwrap();
    let other_patients = PlacementTask {
        b_runs: vec!["fold-1".into()],
        ..task.clone()
    };
    let e = first.placements(&other_patients).unwrap_err();
    assert!(
        matches!(
            e,
            NodeError::Placement(PlacementError::DifferentPatients { .. })
        ),
        "{e}"
    );
    let twice = PlacementTask {
        a_runs: vec!["run-a".into(), "run-b".into()],
        ..task
    };
    let e = first.placements(&twice).unwrap_err().to_string();
    assert!(e.contains("scored in more than one run"), "{e}");
}

/// A site that requires DP, with `epsilon` per run and its ledger at `ledger`.
fn private_node(ledger: &Path, epsilon: f64, lifetime: Option<f64>) -> Node {
    let lifetime = lifetime.map_or(String::new(), |l| format!("lifetime_epsilon = {l}\n"));
    node_with(
        None,
        &format!(
            "[privacy]\nrequire_dp = true\nepsilon = {epsilon}\n{lifetime}ledger = {:?}\n",
            ledger.display().to_string()
        ),
    )
}

fn refusal(e: NodeError) -> String {
    assert!(matches!(e, NodeError::Policy(_)), "{e}");
    e.to_string()
}

const NEWTON_DP: DpSgd = DpSgd {
    noise_multiplier: 2.0,
    clip: 4.0,
    sample_rate: 1.0,
};

/// The ε of `k` Gaussian releases of noise multiplier σ, by the accountant itself.
fn epsilon_of(k: u64, sigma: f64) -> f64 {
    use fedslm_metrics::rdp::{composed, epsilon, DEFAULT_ORDERS};
    epsilon(
        &DEFAULT_ORDERS,
        &composed(1.0, sigma, k, &DEFAULT_ORDERS).unwrap(),
        1e-5,
    )
    .unwrap()
    .epsilon
}

#[test]
fn a_site_that_requires_dp_refuses_a_release_in_the_clear_and_answers_a_private_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = private_node(&tmp.path().join("ledger.jsonl"), 50.0, None);
    let p = clinical::names().len();
    let zero = clinical_model(&vec![0.0; p]);
    let e = refusal(node.fit("r", &newton(&zero, None, None)).unwrap_err());
    assert!(e.contains("privacy.require_dp"), "{e}");
    let e = refusal(node.evaluate("r", &evaluation(&zero, None)).unwrap_err());
    assert!(e.contains("privacy.require_dp"), "{e}");
    assert!(
        node.ledger().unwrap().entries().is_empty(),
        "nothing refused is spent"
    );

    let exact = node_with(None, "")
        .fit("r", &newton(&zero, None, None))
        .unwrap();
    let private = node
        .fit("r", &newton(&zero, None, Some(NEWTON_DP)))
        .unwrap();
    assert_eq!(private.examples, exact.examples);
    assert!(private.train_loss.is_nan(), "the loss is not released");
    assert_ne!(private.weights, exact.weights, "noised");
    let noisy = EvaluateTask {
        histogram_noise: Some(2.0),
        adapt_batch_norm: false,
        ..evaluation(&zero, None)
    };
    let report = node.evaluate("r", &noisy).unwrap();
    assert!(report.loss.is_nan());
    assert_eq!(
        report.examples,
        report
            .histogram
            .positive
            .iter()
            .chain(&report.histogram.negative)
            .sum::<u64>()
    );
    let kinds: Vec<&str> = node
        .ledger()
        .unwrap()
        .entries()
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["newton", "evaluate"]);
    // A Newton task that subsamples is not what the node computes: refused rather than misaccounted.
    let subsampled = DpSgd {
        sample_rate: 0.5,
        ..NEWTON_DP
    };
    assert!(matches!(
        node.fit("r", &newton(&zero, None, Some(subsampled)))
            .unwrap_err(),
        NodeError::Privacy(_)
    ));
}

#[test]
fn the_budget_refuses_the_release_that_would_exceed_it_also_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = tmp.path().join("site/ledger.jsonl");
    // A budget that pays for three releases at σ = 2 and not four.
    let (three, four) = (epsilon_of(3, 2.0), epsilon_of(4, 2.0));
    assert!(three < four);
    let budget = 0.5 * (three + four);
    let p = clinical::names().len();
    let zero = clinical_model(&vec![0.0; p]);
    let task = newton(&zero, None, Some(NEWTON_DP));
    {
        let mut node = private_node(&ledger, budget, None);
        for _ in 0..3 {
            node.fit("run-1", &task).unwrap();
        }
        let e = refusal(node.fit("run-1", &task).unwrap_err());
        assert!(e.contains("privacy.epsilon"), "{e}");
    }
    // A new process reads the ledger back: the run's budget is still spent.
    // Over all runs: four releases, not five.
    let lifetime = 0.5 * (epsilon_of(4, 2.0) + epsilon_of(5, 2.0));
    let mut node = private_node(&ledger, budget, Some(lifetime));
    assert_eq!(node.ledger().unwrap().entries().len(), 3);
    let e = refusal(node.fit("run-1", &task).unwrap_err());
    assert!(e.contains("privacy.epsilon"), "{e}");
    let spent = node
        .ledger()
        .unwrap()
        .spent(Some("run-1"), 1e-5)
        .unwrap()
        .epsilon;
    assert!((spent - three).abs() < 1e-9 * three, "{spent} {three}");
    // Another run has a budget of its own, within the lifetime's.
    node.fit("run-2", &task).unwrap();
    let e = refusal(node.fit("run-2", &task).unwrap_err());
    assert!(e.contains("privacy.lifetime_epsilon"), "{e}");
}

/// The tiny synthetic cohort (images at every centre), written into `dir`.
fn tiny_cohort(dir: &Path) -> PathBuf {
    use fedslm_cohort::synth::{write_cohort, Geometry, Plan, Preset};
    let centers = Preset::Tiny.centers();
    write_cohort(
        dir,
        5,
        &centers,
        &Plan::natural(&centers),
        &Geometry::standard(),
        &|_| {},
    )
    .unwrap();
    dir.to_path_buf()
}

/// The configuration of a node of `center` of the cohort in `cohort`, keeping its scores in `scores`.
fn image_config(cohort: &Path, center: &str, scores: &Path) -> ClientConfig {
    let text = format!(
        "center = {center:?}\nserver = \"127.0.0.1:9\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
         cohort = {:?}\nscores = {:?}\n",
        cohort.join(center).display().to_string(),
        scores.display().to_string()
    );
    ClientConfig::parse(&text, Path::new("/nowhere/client.toml")).unwrap()
}

fn image_node(cohort: &Path, center: &str, scores: &Path) -> Node {
    Node::load(&image_config(cohort, center, scores)).unwrap()
}

fn mri_model() -> Weights {
    let pre = fedslm_cohort::PreprocessSettings::default();
    let config = fedslm_model::NetConfig::compact(pre.channels(), pre.size, 0);
    fedslm_model::Network::new(ModelKind::Mri, config, 1)
        .unwrap()
        .to_weights()
        .unwrap()
}

fn mri_fit(weights: &Weights, round: u32, fedbn: bool) -> FitTask {
    FitTask {
        round,
        model: ModelKind::Mri,
        weights: weights.clone(),
        local_epochs: 1,
        learning_rate: 0.01,
        batch_size: 4,
        fold: None,
        seed: 3,
        objective: LocalObjective::Plain,
        keep_batch_norm_local: fedbn,
        dp: None,
    }
}

fn mri_evaluation(weights: &Weights, adapt: bool) -> EvaluateTask {
    EvaluateTask {
        model: ModelKind::Mri,
        adapt_batch_norm: adapt,
        ..evaluation(weights, None)
    }
}

fn is_batch_norm(t: &fedslm_protocol::Tensor) -> bool {
    t.role() != fedslm_protocol::TensorRole::Parameter
}

#[test]
fn under_fedbn_each_centre_keeps_its_own_batch_norm_and_sends_the_global_one_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tiny_cohort(&tmp.path().join("cohort"));
    let global = mri_model();
    let mut kept = Vec::new();
    for center in ["center-a", "center-b"] {
        let mut node = image_node(&cohort, center, &tmp.path().join(center));
        let sent = node
            .fit("fedbn", &mri_fit(&global, 1, true))
            .unwrap()
            .weights;
        for (g, s) in global.tensors().iter().zip(sent.tensors()) {
            if is_batch_norm(g) {
                assert_eq!(
                    g.bytes(),
                    s.bytes(),
                    "{}: {} left the centre",
                    center,
                    g.name()
                );
            }
        }
        assert!(
            global
                .tensors()
                .iter()
                .zip(sent.tensors())
                .any(|(g, s)| !is_batch_norm(g) && g.bytes() != s.bytes()),
            "{center} trained"
        );
        let own = node.local_batch_norm("fedbn").unwrap().clone();
        assert!(own.tensors().iter().all(is_batch_norm));
        // The centre scores the run's model with its own layers: not as the global model's would.
        let with_own = node
            .evaluate("fedbn", &mri_evaluation(&global, false))
            .unwrap();
        let with_global = node
            .evaluate("other", &mri_evaluation(&global, false))
            .unwrap();
        assert_ne!(with_own.histogram, with_global.histogram, "{center}");
        // Without FedBN nothing is kept and the trained layers are sent.
        let plain = node
            .fit("plain", &mri_fit(&global, 1, false))
            .unwrap()
            .weights;
        assert!(node.local_batch_norm("plain").is_none());
        assert!(global
            .tensors()
            .iter()
            .zip(plain.tensors())
            .any(|(g, s)| is_batch_norm(g) && g.bytes() != s.bytes()));
        kept.push(own);
    }
    let differ = kept[0]
        .tensors()
        .iter()
        .zip(kept[1].tensors())
        .any(|(a, b)| a.bytes() != b.bytes());
    assert!(differ, "the centres' layers differ");
}

#[test]
fn adabn_rescores_with_the_validators_own_statistics_and_reads_no_label() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tiny_cohort(&tmp.path().join("cohort"));
    // A model trained at one centre, validated at another.
    let mut trainer = image_node(&cohort, "center-a", &tmp.path().join("a"));
    let model = trainer
        .fit("run", &mri_fit(&mri_model(), 1, false))
        .unwrap()
        .weights;
    let scores = |dir: &Path, run: &str| -> Vec<(String, f64)> {
        let mut s: Vec<(String, f64)> = fedslm_node::scores::read_scores(dir, run)
            .unwrap()
            .into_iter()
            .map(|s| (s.patient, s.probability))
            .collect();
        s.sort_by(|a, b| a.0.cmp(&b.0));
        s
    };
    let dir = tmp.path().join("external");
    let mut validator = image_node(&cohort, "external", &dir);
    validator
        .evaluate("plain", &mri_evaluation(&model, false))
        .unwrap();
    validator
        .evaluate("adapted", &mri_evaluation(&model, true))
        .unwrap();
    let plain = scores(&dir, "plain");
    let adapted = scores(&dir, "adapted");
    assert_ne!(plain, adapted, "the statistics were recomputed");
    // The same patients with every label flipped: the adapted scores do not move.
    let flipped_dir = tmp.path().join("flipped");
    let config = image_config(&cohort, "external", &flipped_dir);
    let mut site = fedslm_node::SiteCohort::load(&config).unwrap();
    for s in &mut site.samples {
        s.label = s.label.map(|y| !y);
    }
    let mut flipped = Node::new(config, site).unwrap();
    flipped
        .evaluate("adapted", &mri_evaluation(&model, true))
        .unwrap();
    assert_eq!(scores(&flipped_dir, "adapted"), adapted);
}

fn landmarks_task() -> FitTask {
    let zeros = fedslm_protocol::landmarks::landmark_weights(&[[0.0; 11]; 3]).unwrap();
    FitTask {
        objective: LocalObjective::Landmarks,
        model: ModelKind::Mri,
        ..mri_fit(&zeros, 1, false)
    }
}

#[test]
fn a_landmarks_task_is_answered_with_the_mean_landmarks_of_the_centres_images_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tiny_cohort(&tmp.path().join("cohort"));
    let mut node = image_node(&cohort, "center-a", &tmp.path().join("scores"));
    let result = node.fit("landmarks", &landmarks_task()).unwrap();
    assert_eq!(result.weights.len(), 1);
    let sent = fedslm_protocol::landmarks::landmarks_of(&result.weights).unwrap();
    // Worked out here from each crop's sequences, one by one.
    let samples = &node.cohort().samples;
    assert_eq!(result.examples, samples.len() as u64);
    for (s, sequence) in sent.iter().enumerate() {
        for (i, v) in sequence.iter().enumerate() {
            let mean = samples
                .iter()
                .map(|x| {
                    let per = x.image.len() / 3;
                    fedslm_cohort::landmarks(&x.image[s * per..(s + 1) * per])[i]
                })
                .sum::<f64>()
                / samples.len() as f64;
            assert!((v - mean).abs() < 1e-12, "sequence {s}, landmark {i}");
        }
        assert_eq!((sequence[0], sequence[10]), (0.0, 1.0));
    }
    // The scale made of them is one client.toml accepts; a node already on it refuses to measure again.
    let scale = fedslm_cohort::IntensityScale {
        t2w: sent[0],
        dwi: sent[1],
        adc: sent[2],
    };
    scale.check().unwrap();
    let mut config = image_config(&cohort, "center-a", &tmp.path().join("scores"));
    config.preprocess.intensity_scale = Some(scale);
    let mut standardised = Node::load(&config).unwrap();
    let e = standardised.fit("again", &landmarks_task()).unwrap_err();
    assert!(matches!(e, NodeError::AlreadyStandardised), "{e}");
}

#[test]
fn a_site_that_does_not_accept_landmarks_or_requires_dp_does_not_send_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tiny_cohort(&tmp.path().join("cohort"));
    for (extra, why) in [
        (
            "[privacy]\naccept = [\"fit\", \"evaluate\"]\n",
            "privacy.accept",
        ),
        (
            "[privacy]\nrequire_dp = true\nepsilon = 4.0\nledger = \"/nowhere/ledger\"\n",
            "landmarks",
        ),
    ] {
        let mut config = image_config(&cohort, "center-a", &tmp.path().join("scores"));
        let text = format!(
            "center = \"center-a\"\nserver = \"127.0.0.1:9\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
             cohort = {:?}\n{extra}",
            cohort.join("center-a").display().to_string()
        );
        config.privacy = ClientConfig::parse(&text, Path::new("/nowhere/client.toml"))
            .unwrap()
            .privacy;
        let mut node = Node::load(&config).unwrap();
        let e = node.fit("landmarks", &landmarks_task()).unwrap_err();
        assert!(matches!(e, NodeError::Policy(_)), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
}
