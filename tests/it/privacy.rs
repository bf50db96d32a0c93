//! Differential privacy end to end, with the `fedslm` binary: a federated Newton run under DP whose every
//! release is in each site's ledger and whose ε per centre is in the audit log and the final model's card,
//! equal to the site's own; a run that requires DP refusing a site that does not; and a node killed between
//! its ledger entry and its release, whose ledger already counts the release the server never received.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::fedslm;
use crate::common::process::{Proc, Run};
use fedslm_client::ClientConfig;
use fedslm_node::ledger::Ledger;
use serde_json::Value;

const CENTERS: [&str; 3] = ["center-a", "center-b", "center-c"];

/// Rounds of noised Newton, the run's noise, and the histograms' bins.
const SERVER: &str = "initial_model = \"init.safetensors\"\nrounds = 3\nevaluation_bins = 10\n\
                      [privacy]\nrequire_dp = true\nnoise_multiplier = 1.5\n";

const SITE: &str = "[privacy]\nrequire_dp = true\nepsilon = 40.0\nledger = \"ledger.jsonl\"\n";

fn private_run(d: &std::path::Path) -> (Run, Vec<PathBuf>) {
    let run = Run::new(d, &CENTERS.map(|c| (c, "train")), SERVER);
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients = CENTERS
        .iter()
        .map(|c| run.client_config(c, &crate::common::reference("clinical").join(c), SITE))
        .collect();
    (run, clients)
}

fn audit(out: &std::path::Path) -> Vec<Value> {
    let store = fedslm_server::Store::open_existing(out).unwrap();
    store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
        .collect()
}

#[test]
fn a_private_run_is_in_every_ledger_and_its_epsilon_in_the_audit_log_and_the_card() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (run, clients) = private_run(d);
    let (server_out, _) = run.go(&clients);
    assert!(
        server_out.contains("run completed after 3 rounds"),
        "{server_out}"
    );

    let entries = audit(&run.out());
    let (_, card) = fedslm_model::load(&run.out().join("clinical.safetensors")).unwrap();
    for c in CENTERS {
        let ledger = Ledger::open(&d.join(c).join("ledger.jsonl")).unwrap();
        let kinds: Vec<&str> = ledger.entries().iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["newton", "newton", "newton", "evaluate"], "{c}");
        let site = ledger.spent(Some("e2e"), 1e-5).unwrap().epsilon;
        let spent: Vec<&Value> = entries
            .iter()
            .filter(|e| e["event"] == "privacy_spent" && e["center"] == c)
            .collect();
        assert_eq!(spent.len(), 1, "{c}");
        let server = spent[0]["epsilon"].as_f64().unwrap();
        assert!((server - site).abs() < 1e-9 * site, "{c}: {server} {site}");
        assert_eq!(spent[0]["fits"], 3);
        let in_card = card.training["privacy"]["by_center"][c]["epsilon"]
            .as_f64()
            .unwrap();
        assert!((in_card - site).abs() < 1e-9 * site, "{}", card.training);
        // `fedslm privacy` reads the same ledger.
        let (ok, out, err) = fedslm(&[
            "privacy",
            "--config",
            d.join(c).join("client.toml").to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        assert!(
            out.contains("e2e") && out.contains(&format!("{site:.4}")),
            "{out}"
        );
    }
    assert_eq!(card.training["privacy"]["noise_multiplier"], 1.5);
    // The losses were not released.
    let rounds = std::fs::read_to_string(run.out().join("rounds.jsonl")).unwrap();
    assert!(rounds.contains("\"train_loss\":null"), "{rounds}");
}

#[test]
fn a_run_that_requires_dp_refuses_a_site_whose_policy_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (run, _) = private_run(d);
    let open = run.client_config(
        "center-a",
        &crate::common::reference("clinical").join("center-a"),
        "",
    );
    let server = run.server(&[], &[]);
    let (ok, out, err) = run.client(&open, 1).wait();
    assert!(!ok);
    assert!(
        format!("{out}{err}").contains("PrivacyRequired"),
        "{out}{err}"
    );
    server.kill();
}

#[test]
fn a_node_killed_after_its_ledger_entry_and_before_its_release_has_already_counted_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (run, clients) = private_run(d);
    let server = run.server(&[], &[]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedslm"));
    cmd.args(["client", "--max-attempts", "5", "--config"])
        .arg(&clients[0])
        .env("RUST_LOG", "warn")
        .env(fedslm_server::failpoint::ENV, "ledger-written@1");
    let stopped = Proc::spawn(cmd);
    let others: Vec<Proc> = clients[1..].iter().map(|c| run.client(c, 5)).collect();
    stopped.wait_for(
        |_, err| err.contains("failpoint ledger-written reached at round 1"),
        Duration::from_secs(60),
    );
    // While that node holds the site's ledger, a second node of the site is refused at its start, and
    // `fedslm privacy` reads the ledger as it is.
    let (ok, out, err) = run.client(&clients[0], 1).wait();
    assert!(
        !ok && err.contains("another fedslm node of this site holds it"),
        "{out}{err}"
    );
    let (ok, out, err) = fedslm(&["privacy", "--config", clients[0].to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("1 releases"), "{out}");
    stopped.kill();
    // The release is in the site's ledger, durably...
    let config = ClientConfig::load(&clients[0]).unwrap();
    let ledger = Ledger::open(config.ledger.as_ref().unwrap()).unwrap();
    assert_eq!(ledger.entries().len(), 1);
    assert_eq!(
        (ledger.entries()[0].run.as_str(), ledger.entries()[0].round),
        ("e2e", 1)
    );
    assert!(ledger.spent(Some("e2e"), 1e-5).unwrap().epsilon > 0.0);
    drop(ledger);
    server.kill();
    for p in others {
        p.kill();
    }
    // ...and the server never received it.
    let accepted = audit(&run.out())
        .into_iter()
        .filter(|e| e["event"] == "update_accepted" && e["center"] == "center-a")
        .count();
    assert_eq!(accepted, 0);
}
