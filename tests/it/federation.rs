//! Whole runs of the `fedslm` binary over loopback QUIC with mutual TLS: a server process and one client
//! process per centre, each with its own certificate.

use std::path::{Path, PathBuf};

use crate::common::fedslm;
use crate::common::process::Run;
use serde_json::Value;

fn reference() -> PathBuf {
    crate::common::reference("clinical")
}

#[test]
fn federated_newton_over_the_reference_centers_equals_the_pooled_statsmodels_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 30\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| run.client_config(c, &reference().join(c), ""))
        .collect();
    let (server_out, client_outs) = run.go(&clients);
    assert!(server_out.contains("run completed after"), "{server_out}");
    for out in &client_outs {
        assert!(out.contains("finished after"), "{out}");
    }

    crate::common::assert_pooled_statsmodels_fit(&d.join("out/clinical.safetensors"));
    // What each centre sent: its statistics only, f64, one file per round.
    let sent = std::fs::read_dir(d.join("center-a/sent"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .count();
    let rounds = std::fs::read_to_string(d.join("out/rounds.jsonl")).unwrap();
    assert_eq!(sent, rounds.lines().count());
    let (first, _) = fedslm_model::load(&d.join("center-a/sent/round-0001.safetensors")).unwrap();
    let mut names: Vec<&str> = first.tensors().iter().map(|t| t.name()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "newton.fitted_exactly",
            "newton.gradient",
            "newton.hessian",
            "newton.log_likelihood"
        ]
    );
}

#[test]
fn three_centers_train_one_validates_and_each_global_model_is_the_weighted_mean_of_what_was_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = crate::common::tiny_synth_cohort(d);
    let centers = crate::common::TINY_CENTRES;
    let (_, outs) = crate::common::process::tiny_fedprox_run(d, &cohort, "");
    assert!(
        !outs[3].contains("trained"),
        "the validation centre never trains: {}",
        outs[3]
    );
    assert!(
        !d.join("external/sent/round-0001.safetensors").exists(),
        "no update from the validator"
    );

    let rounds: Vec<Value> = std::fs::read_to_string(d.join("out/rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    let mut previous = fedslm_model::load(&d.join("init.safetensors")).unwrap().0;
    for round in 1..=2 {
        let file = format!("round-{round:04}.safetensors");
        let checkpoint = rounds[round - 1]["checkpoint"].as_str().unwrap();
        let (global, _) = fedslm_model::load(
            &d.join("out/checkpoints")
                .join(format!("{checkpoint}.safetensors")),
        )
        .unwrap();
        let sent: Vec<(fedslm_protocol::Weights, f64)> = centers[..3]
            .iter()
            .map(|(c, _)| {
                let (w, card) = fedslm_model::load(&d.join(c).join("sent").join(&file)).unwrap();
                (w, card.training["examples"].as_f64().unwrap())
            })
            .collect();
        let total: f64 = sent.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 26.0, "every labelled patient of a, b and c, once");
        for t in global.tensors() {
            let mut mean = vec![0.0; t.element_count()];
            for (w, n) in &sent {
                for (m, v) in mean
                    .iter_mut()
                    .zip(w.require(t.name()).unwrap().to_f64_vec())
                {
                    *m += n * v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= total);
            for (g, m) in t.to_f64_vec().iter().zip(&mean) {
                assert!(
                    (g - m).abs() <= 1e-6 * m.abs().max(1e-3),
                    "round {round}, {}: {g} vs {m}",
                    t.name()
                );
            }
        }
        assert_ne!(global, previous, "round {round} changed the model");
        previous = global;
    }
    let contributors = crate::common::field_strs(&rounds[0]["contributions"], "center");
    assert!(
        !contributors.contains(&"external") && contributors.len() == 3,
        "{contributors:?}"
    );
    let (final_model, card) = fedslm_model::load(&d.join("out/mri.safetensors")).unwrap();
    assert_eq!(final_model, previous);
    assert_eq!(card.training["strategy"], "fedprox");

    // The final model was evaluated everywhere: the training centres on their patients, the validator on its.
    let evaluation = &rounds[1]["evaluation"];
    let reported = evaluation["centers"].as_array().unwrap();
    assert_eq!(reported.len(), 4, "{evaluation}");
    let internal = &evaluation["internal"]["n"];
    assert_eq!(
        internal["positives"].as_u64().unwrap() + internal["negatives"].as_u64().unwrap(),
        26
    );
    assert!(evaluation["external"]["n"]["positives"].as_u64().unwrap() > 0);
    assert_eq!(card.metrics["internal"], evaluation["internal"]);

    // Every frame each node sent, byte for byte: only these kinds, no patient id or file name anywhere in
    // them, model tensors exactly the global model's, evaluation as histograms of the bins asked.
    let init = fedslm_model::load(&d.join("init.safetensors")).unwrap().0;
    for (c, role) in centers {
        let manifest = std::fs::read_to_string(cohort.join(c).join("manifest.csv")).unwrap();
        let identifiers: Vec<&str> = manifest
            .lines()
            .skip(1)
            .flat_map(|l| {
                // The pseudonym and the image paths (which contain it).
                let f: Vec<&str> = l.split(',').collect();
                let mut ids = vec![f[0]];
                ids.extend_from_slice(&f[6..]);
                ids
            })
            .filter(|s| !s.is_empty())
            .collect();
        let mut kinds = Vec::new();
        for frame in std::fs::read_dir(d.join(c).join("sent/frames")).unwrap() {
            let bytes = std::fs::read(frame.unwrap().path()).unwrap();
            for id in &identifiers {
                assert!(
                    !bytes.windows(id.len()).any(|w| w == id.as_bytes()),
                    "{c} sent {id:?}"
                );
            }
            let (msg, _) = fedslm_protocol::codec::decode(&bytes, &Default::default()).unwrap();
            match &msg {
                fedslm_protocol::Message::Hello(_) => {}
                fedslm_protocol::Message::FitResult(r) => {
                    assert_eq!(role, "train");
                    let names = |w: &fedslm_protocol::Weights| {
                        w.tensors()
                            .iter()
                            .map(|t| (t.name().to_string(), t.shape().to_vec()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(names(&r.weights), names(&init));
                }
                fedslm_protocol::Message::EvalReport(r) => {
                    assert_eq!(r.histogram.positive.len(), 1000);
                    let n: u64 = r
                        .histogram
                        .positive
                        .iter()
                        .chain(&r.histogram.negative)
                        .sum();
                    assert_eq!(n, r.examples);
                }
                other => panic!("{c} sent a {:?}", other.kind()),
            }
            kinds.push(format!("{:?}", msg.kind()));
        }
        kinds.sort();
        kinds.dedup();
        let want: &[&str] = if role == "train" {
            &["EvalReport", "FitResult", "Hello"]
        } else {
            &["EvalReport", "Hello"]
        };
        assert_eq!(kinds, want, "{c}");
    }
}

#[test]
fn a_node_checks_its_cohort_before_anything_leaves_and_dry_run_says_what_would() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = crate::common::tiny_synth_cohort(d);
    let run = Run::new(d, &[("center-a", "train")], "");
    let preprocess = "[preprocess]\nsize = 32\nneighbours = 0\n";
    let config = run.client_config("center-a", &cohort.join("center-a"), preprocess);
    let config = config.display().to_string();
    let (ok, out, err) = fedslm(&["client", "--config", &config, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cohort: centre center-a, 10 patients (4 with SLM), 10 with images"),
        "{out}"
    );
    assert!(
        out.contains("Hello, ") && out.contains("FitResult, "),
        "{out}"
    );
    assert!(out.contains("never: images, patient ids"), "{out}");

    // A broken manifest stops the node before it connects to anything (no server runs here).
    let manifest = cohort.join("center-a/manifest.csv");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = text.replacen(",M,", ",X,", 1);
    assert_ne!(broken, text);
    std::fs::write(&manifest, broken).unwrap();
    let (ok, _, err) = fedslm(&["client", "--config", &config, "--max-attempts", "0"]);
    assert!(!ok);
    assert!(err.contains("manifest.csv") && err.contains("sex"), "{err}");
    assert!(!err.contains("connect"), "{err}");
}

#[test]
fn federated_cross_validation_holds_each_patient_out_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let k = 3;
    let keys = |fold: u32| {
        format!(
            "initial_model = \"init.safetensors\"\nrounds = 30\ncv_fold = {fold}\ncv_folds = {k}\n\
             evaluation_bins = 200\n"
        )
    };
    let run = Run::new(d, &centers.map(|c| (c, "train")), &keys(0));
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| run.client_config(c, &reference().join(c), ""))
        .collect();
    let mut held_out: std::collections::BTreeMap<String, u64> = Default::default();
    let mut pooled = fedslm_metrics::ScoreHistograms::new(200).unwrap();
    for fold in 0..k {
        run.write_server_config(&centers.map(|c| (c, "train")), &keys(fold));
        let args: &[&str] = if fold == 0 { &[] } else { &["--new-run"] };
        let (out, _) = run.go_with(args, &clients);
        assert!(
            out.contains(&format!("(fold {} of {k})", fold + 1)),
            "{out}"
        );
        let last: Value = serde_json::from_str(
            std::fs::read_to_string(d.join("out/rounds.jsonl"))
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        let evaluation = &last["evaluation"];
        assert_eq!(evaluation["fold"]["index"], fold);
        for c in evaluation["centers"].as_array().unwrap() {
            let n = c["examples"].as_u64().unwrap();
            *held_out
                .entry(c["center"].as_str().unwrap().to_string())
                .or_default() += n;
            // Trained on the other folds only.
            let trained = last["contributions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["center"] == c["center"])
                .unwrap()["examples"]
                .as_u64()
                .unwrap();
            let all = labelled(&reference().join(c["center"].as_str().unwrap()));
            assert_eq!(trained + n, all, "{c}");
            let h = fedslm_metrics::ScoreHistograms {
                positive: serde_json::from_value(c["histogram"]["positive"].clone()).unwrap(),
                negative: serde_json::from_value(c["histogram"]["negative"].clone()).unwrap(),
            };
            pooled.merge(&h).unwrap();
        }
    }
    // Each centre's patients were evaluated exactly once, out of fold.
    for c in centers {
        assert_eq!(held_out[c], labelled(&reference().join(c)), "{c}");
    }
    let oof = pooled.delong().unwrap();
    assert!(
        oof.auc > 0.7 && oof.auc < 0.95,
        "out-of-fold AUC {}",
        oof.auc
    );
}

/// Patients with a known outcome in a centre's manifest.
fn labelled(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("manifest.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "slm").unwrap();
    lines
        .filter(|l| !l.split(',').nth(col).unwrap_or("").is_empty())
        .count() as u64
}

/// The paired test of two cross-validated networks in a real deployment: four federations of separate
/// processes (two models, two folds), whose nodes keep their patients' scores on their own disk, then
/// `server compare` asks each training centre for its placement sums. The test's AUCs are the pooled
/// histograms' (every patient placed once), and a comparison over the wrong runs is refused.
#[test]
fn server_compare_pairs_two_models_from_the_scores_the_centers_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = crate::common::tiny_synth_cohort(d);
    let centers = crate::common::TINY_CENTRES;
    let node_settings = |c: &str| {
        format!(
            "scores = \"{}\"\n[preprocess]\nsize = 32\nneighbours = 0\n",
            d.join("scores").join(c).display()
        )
    };
    let mut pooled: std::collections::BTreeMap<&str, fedslm_metrics::ScoreHistograms> =
        Default::default();
    let mut outs: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (i, model) in ["mri", "combined"].into_iter().enumerate() {
        for fold in 0..2 {
            let dir = d.join(format!("{model}-{fold}"));
            std::fs::create_dir_all(&dir).unwrap();
            let keys = format!(
                "initial_model = \"{}\"\nrounds = 1\nlocal_epochs = 1\nbatch_size = 4\ncv_fold = {fold}\n\
                 cv_folds = 2\nevaluation_bins = 100\n",
                d.join(format!("{model}.safetensors")).display()
            );
            let run = Run::with_id(&dir, &format!("{model}-fold-{fold}"), &centers, &keys);
            let clients: Vec<PathBuf> = centers
                .iter()
                .map(|(c, _)| run.client_config(c, &cohort.join(c), &node_settings(c)))
                .collect();
            if fold == 0 {
                crate::common::init_model(
                    model,
                    &d.join(format!("{model}.safetensors")),
                    &[
                        "--config",
                        &clients[0].display().to_string(),
                        "--seed",
                        &i.to_string(),
                    ],
                );
            }
            let (out, _) = run.go(&clients);
            assert!(out.contains("run completed after 1 round"), "{out}");
            let last: fedslm_server::StoredRound = serde_json::from_str(
                std::fs::read_to_string(run.out().join("rounds.jsonl"))
                    .unwrap()
                    .lines()
                    .last()
                    .unwrap(),
            )
            .unwrap();
            let evaluation = last.evaluation.expect("the last round is evaluated");
            for (_, h) in evaluation.histograms(fedslm_protocol::Role::Train).unwrap() {
                match pooled.get_mut(model) {
                    Some(p) => p.merge(&h).unwrap(),
                    None => {
                        pooled.insert(model, h);
                    }
                }
            }
            outs.entry(model)
                .or_default()
                .push(run.out().display().to_string());
        }
    }
    // Each node kept each run's scores where it was told, one file per run.
    assert!(d.join("scores/center-b/combined-fold-1.csv").is_file());

    let compare = |dir: &Path, a: &[String], b: &[String]| {
        std::fs::create_dir_all(dir).unwrap();
        let run = Run::with_id(dir, "compare", &centers, "");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fedslm"));
        cmd.args(["server", "compare", "--config"])
            .arg(dir.join("server.toml"))
            .args(["--a", &a.join(","), "--b", &b.join(","), "--json"])
            .arg(dir.join("comparison.json"))
            .env("RUST_LOG", "warn");
        let server = crate::common::process::Proc::spawn(cmd);
        server.wait_for(
            |out, err| out.contains("listening on") || !err.is_empty(),
            std::time::Duration::from_secs(30),
        );
        let clients: Vec<_> = centers
            .iter()
            .map(|(c, _)| run.client(&run.client_config(c, &cohort.join(c), &node_settings(c)), 5))
            .collect();
        let (ok, out, err) = server.wait();
        for c in clients {
            c.wait();
        }
        (ok, out, err, run)
    };
    let (ok, out, err, run) = compare(&d.join("compare"), &outs["mri"], &outs["combined"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("paired DeLong (Internal)"), "{out}");
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(run.dir.join("comparison.json")).unwrap())
            .unwrap();
    for (key, model) in [("auc_a", "mri"), ("auc_b", "combined")] {
        let want = pooled[model].delong().unwrap().auc;
        assert!(
            (c[key].as_f64().unwrap() - want).abs() < 1e-9,
            "{key}: {c} against the pooled histograms' {want}"
        );
    }
    let p = c["p"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0, "{c}");
    // What each node sent in this pass: one PlacementReport of ten sums, nothing else but its Hello.
    for (center, role) in centers {
        let frames = run.dir.join(center).join("sent/frames");
        let kinds: Vec<String> = std::fs::read_dir(&frames)
            .map(|r| {
                r.map(|e| {
                    let bytes = std::fs::read(e.unwrap().path()).unwrap();
                    let (msg, _) =
                        fedslm_protocol::codec::decode(&bytes, &Default::default()).unwrap();
                    msg.kind().to_string()
                })
                .collect()
            })
            .unwrap_or_default();
        let placements = kinds.iter().filter(|k| *k == "PlacementReport").count();
        assert_eq!(
            placements,
            usize::from(role == "train"),
            "{center}: {kinds:?}"
        );
    }

    // One fold of B missing: the centres' patients differ between A and B, and the pass says so.
    let (ok, out, err, _) = compare(&d.join("compare-bad"), &outs["mri"], &outs["combined"][..1]);
    assert!(!ok, "{out}");
    assert!(err.contains("not all the same"), "{err}");
}

#[test]
fn a_count_floor_and_a_refused_kind_are_refused_by_name_audited_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 30\nevaluation_bins = 10\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    // center-b describes no class of fewer than 1000 patients; center-c answers Newton statistics only.
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| {
            let policy = match *c {
                "center-b" => "[privacy]\nmin_per_class = 1000\n",
                "center-c" => "[privacy]\naccept = [\"newton\"]\n",
                _ => "",
            };
            run.client_config(c, &reference().join(c), policy)
        })
        .collect();
    let (server_out, _) = run.go(&clients);
    assert!(server_out.contains("run completed after"), "{server_out}");
    let store = fedslm_server::Store::open_existing(&d.join("out")).unwrap();
    let dropped = |center: &str| -> Vec<String> {
        store
            .audit_entries()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
            .filter(|e| e["event"] == "task_dropped" && e["center"] == center)
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .collect()
    };
    let b = dropped("center-b");
    assert!(
        b.len() == 1 && b[0].contains("PolicyRefused") && b[0].contains("privacy.min_per_class"),
        "{b:?}"
    );
    let c = dropped("center-c");
    assert!(
        c.len() == 1 && c[0].contains("PolicyRefused") && c[0].contains("privacy.accept"),
        "{c:?}"
    );
    assert!(dropped("center-a").is_empty());
    let evaluation = store.rounds().unwrap().pop().unwrap().evaluation.unwrap();
    let evaluated: Vec<&str> = evaluation
        .centers
        .iter()
        .map(|c| c.center.as_str())
        .collect();
    assert_eq!(evaluated, ["center-a"]);
}

#[test]
fn a_site_whose_policy_refuses_a_task_is_told_by_name_audited_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nrounds = 30\nevaluation_bins = 100\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    // center-c releases histograms of at most 10 bins; the server asks for 100.
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| {
            let policy = if *c == "center-c" {
                "[privacy]\nmax_bins = 10\n"
            } else {
                ""
            };
            run.client_config(c, &reference().join(c), policy)
        })
        .collect();
    let (server_out, client_outs) = run.go(&clients);
    assert!(server_out.contains("run completed after"), "{server_out}");
    assert!(
        client_outs[2].contains("privacy.max_bins"),
        "{}",
        client_outs[2]
    );
    // The refusal is in the audit log, by name, and the evaluation went on without center-c.
    let store = fedslm_server::Store::open_existing(&d.join("out")).unwrap();
    let refused = store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .filter(|e| e["event"] == "task_dropped" && e["center"] == "center-c")
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("PolicyRefused") && refused[0].contains("privacy.max_bins"),
        "{refused:?}"
    );
    let last = store.rounds().unwrap().pop().unwrap();
    let evaluation = last.evaluation.expect("the final model was evaluated");
    let mut evaluated: Vec<&str> = evaluation
        .centers
        .iter()
        .map(|c| c.center.as_str())
        .collect();
    evaluated.sort();
    assert_eq!(evaluated, ["center-a", "center-b"]);
    assert_eq!(evaluation.missing.len(), 1);
    // Each site's policy hash, from its Hello, is in the audit log and the final model's card.
    let hash = |c: &str| {
        let config = fedslm_client::ClientConfig::load(&d.join(c).join("client.toml")).unwrap();
        fedslm_protocol::hex::to_hex(&config.privacy.hash())
    };
    assert_ne!(hash("center-c"), hash("center-a"));
    let joined: Vec<(String, String)> = store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .filter(|e| e["event"] == "center_joined")
        .map(|e| {
            (
                e["center"].as_str().unwrap().to_string(),
                e["policy_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!joined.is_empty());
    for (center, policy) in &joined {
        assert_eq!(*policy, hash(center), "{center}");
    }
    drop(store);
    let (_, card) = fedslm_model::load(&d.join("out/clinical.safetensors")).unwrap();
    for c in centers {
        assert_eq!(
            card.training["policies"][c],
            hash(c).as_str(),
            "{}",
            card.training
        );
    }
}

#[test]
fn a_landmarks_run_agrees_the_intensity_scale_that_every_client_toml_then_takes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cohort = crate::common::tiny_synth_cohort(d);
    let centers = ["center-a", "center-b", "center-c"];
    let run = Run::new(
        d,
        &centers.map(|c| (c, "train")),
        "initial_model = \"init.safetensors\"\nstrategy = \"landmarks\"\nrounds = 1\n",
    );
    let init = d.join("init.safetensors").display().to_string();
    let (ok, out, err) = fedslm(&["model", "landmarks", "--out", &init]);
    assert!(ok && out.contains("3 x 11 zeros"), "{out}{err}");
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|c| run.client_config(c, &cohort.join(c), ""))
        .collect();
    let (server_out, _) = run.go(&clients);
    assert!(
        server_out.contains("run completed after 1 rounds"),
        "{server_out}"
    );
    assert!(
        server_out.contains("the agreed intensity scale, for every client.toml"),
        "{server_out}"
    );
    // What each centre sent: its mean landmarks alone, counted by its images.
    let mut sum = [[0.0; 11]; 3];
    let mut images = 0.0;
    for c in centers {
        let (sent, card) =
            fedslm_model::load(&d.join(c).join("sent/round-0001.safetensors")).unwrap();
        let names: Vec<&str> = sent.tensors().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["intensity.landmarks"]);
        let n = card.training["examples"].as_f64().unwrap();
        let l = fedslm_protocol::landmarks::landmarks_of(&sent).unwrap();
        for (acc, row) in sum.iter_mut().zip(&l) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += n * v;
            }
        }
        images += n;
    }
    // The scale is their image-weighted mean, written as client.toml takes it: a centre that appends it
    // loads it exactly, and its settings hash (which the server can require) changes.
    let toml = std::fs::read_to_string(run.out().join("intensity_scale.toml")).unwrap();
    assert!(server_out.contains(&toml), "{server_out}");
    let config = &clients[0];
    let before = fedslm_client::ClientConfig::load(config).unwrap();
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, format!("{text}\n{toml}")).unwrap();
    let after = fedslm_client::ClientConfig::load(config).unwrap();
    let scale = after.preprocess.intensity_scale.expect("the scale is read");
    for (agreed, want) in scale.sequences().into_iter().zip(&sum) {
        for (a, w) in agreed.iter().zip(want) {
            assert!((a - w / images).abs() < 1e-12, "{a} {}", w / images);
        }
    }
    assert_ne!(before.settings_hash(), after.settings_hash());
}
