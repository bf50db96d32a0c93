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
