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
