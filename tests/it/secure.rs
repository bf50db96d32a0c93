//! Secure aggregation over loopback QUIC with mutual TLS, the binary's own server and nodes: the server sees
//! only masked vectors, and what it unmasks is the plain run's sum within the fixed-point bound.

use std::path::PathBuf;

use crate::common::process::Run;
use serde_json::Value;

/// Every frame a node kept: its kinds, and the steps of its secure sums.
fn sent_kinds(dir: &std::path::Path) -> Vec<String> {
    let mut kinds = Vec::new();
    for frame in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(frame.unwrap().path()).unwrap();
        let (msg, _) = fedslm_protocol::codec::decode(&bytes, &Default::default()).unwrap();
        kinds.push(match msg {
            fedslm_protocol::Message::Secure(s) => s.name().to_string(),
            other => other.kind().to_string(),
        });
    }
    kinds
}

#[test]
fn federated_newton_through_secure_sums_equals_the_pooled_statsmodels_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 30\nsecure_aggregation = true\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let reference = crate::common::reference("clinical");
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| {
            run.client_config(
                c,
                &reference.join(c),
                "[privacy]\nrequire_secure_aggregation = true\n",
            )
        })
        .collect();
    let (server_out, client_outs) = run.go(&clients);
    assert!(server_out.contains("run completed after"), "{server_out}");
    for out in &client_outs {
        assert!(out.contains("finished after"), "{out}");
        // Each centre hears that its part of each sum was taken: the stream ends after the last step.
        assert!(out.contains("round 1: update accepted"), "{out}");
    }
    crate::common::assert_pooled_statsmodels_fit(&d.join("out/clinical.safetensors"));
    // No centre sent a FitResult or an EvalReport: only the sums' steps.
    let kinds = sent_kinds(&d.join("center-a/sent/frames"));
    assert!(kinds.iter().any(|k| k == "Masked"), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k == "FitResult" || k == "EvalReport"),
        "{kinds:?}"
    );
    let rounds: Vec<Value> = std::fs::read_to_string(d.join("out/rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds[0]["secure"]["examples"], 176, "{}", rounds[0]);
    let evaluation = &rounds.last().unwrap()["evaluation"];
    assert!(
        evaluation["centers"].as_array().unwrap().is_empty(),
        "no centre's own evaluation: {evaluation}"
    );
    assert_eq!(
        evaluation["secure"][0]["centers"].as_array().unwrap().len(),
        3
    );
}

#[test]
fn a_run_without_secure_aggregation_is_refused_by_a_site_that_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 3\nround_retries = 0\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let reference = crate::common::reference("clinical");
    let clients: Vec<PathBuf> = centers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let policy = if i == 0 {
                "[privacy]\nrequire_secure_aggregation = true\n"
            } else {
                ""
            };
            run.client_config(c, &reference.join(c), policy)
        })
        .collect();
    let server = run.server(&[], &[]);
    let children: Vec<_> = clients.iter().map(|c| run.client(c, 5)).collect();
    for c in children {
        let _ = c.wait();
    }
    let (ok, out, err) = server.wait();
    assert!(!ok, "the run cannot go on without the site");
    assert!(
        format!("{out}{err}").contains(
            "center-a (the centre could not do the task (PolicyRefused): this \
             site's policy answers only into a secure sum (privacy.require_secure_aggregation)"
        ),
        "the refusal names the site and the rule: {out}{err}"
    );
}

/// The same FedProx run of the MRI network twice on the tiny cohort, in the clear and through secure sums.
fn tiny_run(d: &std::path::Path, cohort: &std::path::Path, secure: bool) -> Vec<Value> {
    std::fs::create_dir_all(d).unwrap();
    crate::common::process::tiny_fedprox_run(
        d,
        cohort,
        &format!("secure_aggregation = {secure}\n"),
    );
    std::fs::read_to_string(d.join("out/rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_secure_fedprox_run_trains_the_plain_runs_model_to_the_bit_and_pools_the_same_histograms() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let plain = tiny_run(&tmp.path().join("plain"), &cohort, false);
    let secure = tiny_run(&tmp.path().join("secure"), &cohort, true);
    for round in 0..2 {
        assert_eq!(
            plain[round]["checkpoint"],
            secure[round]["checkpoint"],
            "round {}: the same model file, byte for byte",
            round + 1
        );
    }
    let (p, s) = (&plain[1]["evaluation"], &secure[1]["evaluation"]);
    assert_eq!(
        p["internal"], s["internal"],
        "the training centres' pooled figure"
    );
    assert_eq!(
        p["external"], s["external"],
        "the validating centre's own, in the clear"
    );
    // Under secure aggregation the server holds the training centres' sum, and each one's own AUC as it
    // released it; only the validating centre (alone on its side) reported in the clear.
    let sums = s["secure"].as_array().unwrap();
    assert_eq!(sums.len(), 1, "{s}");
    assert_eq!(sums[0]["centers"].as_array().unwrap().len(), 3);
    assert_eq!(sums[0]["own_auc"].as_object().unwrap().len(), 3, "{s}");
    let clear = crate::common::field_strs(&s["centers"], "center");
    assert_eq!(clear, ["external"]);
    // Each centre's own AUC as released equals its figure in the plain run.
    for c in p["centers"].as_array().unwrap() {
        let name = c["center"].as_str().unwrap();
        if name == "external" {
            continue;
        }
        let released = sums[0]["own_auc"][name].as_f64().unwrap();
        assert_eq!(Some(released), c["auc"]["auc"].as_f64(), "{name}");
    }
    let kinds = sent_kinds(&tmp.path().join("secure/center-a/sent/frames"));
    assert!(
        !kinds.iter().any(|k| k == "FitResult" || k == "EvalReport"),
        "{kinds:?}"
    );
}
