//! The node library on a real centre's manifest (`shared/reference/clinical/center-a`, 80 patients with
//! clinical data only): its folds split its patients between training and evaluation, its kept scores pair
//! by patient, and it refuses what a paired test cannot use.

use std::path::{Path, PathBuf};

use fedslm_client::ClientConfig;
use fedslm_model::clinical;
use fedslm_node::{Node, NodeError, PlacementError};
use fedslm_protocol::{
    EvaluateTask, FitTask, Fold, LocalObjective, ModelKind, PlacementTask, Weights,
};

fn center() -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE")).join("clinical/center-a")
}

fn node(scores: Option<&Path>) -> Node {
    let mut text = format!(
        "center = \"center-a\"\nserver = \"127.0.0.1:9\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
         cohort = {:?}\n",
        center().display().to_string()
    );
    if let Some(dir) = scores {
        text += &format!("scores = {:?}\n", dir.display().to_string());
    }
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
        let fit = node
            .fit(&FitTask {
                round: 1,
                model: ModelKind::Clinical,
                weights: zero.clone(),
                local_epochs: 1,
                learning_rate: 0.0,
                batch_size: 1,
                fold,
                seed: 0,
                objective: LocalObjective::NewtonStep,
                keep_batch_norm_local: false,
            })
            .unwrap();
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
