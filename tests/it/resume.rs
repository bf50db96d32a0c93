//! Nothing lost: a server killed (SIGKILL) at each named failpoint and started again goes on from its last
//! committed round; the clients come back by themselves; the run ends with the uninterrupted run's model, its
//! committed rounds intact and its audit chain valid. `server verify` names an edited audit entry or checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::fedslm;
use crate::common::process::Run;
use fedslm_server::failpoint;
use fedslm_server::{Store, StoredRound};

const CENTRES: [(&str, &str); 4] = crate::common::TINY_CENTRES;
const ROUNDS: usize = 5;
const PREPROCESS: &str = "[preprocess]\nsize = 32\nneighbours = 0\n";

fn round_keys() -> String {
    format!(
        "initial_model = \"init.safetensors\"\nrounds = {ROUNDS}\nlocal_epochs = 1\nbatch_size = 4\n\
         round_start_grace_secs = 1\n"
    )
}

/// A federation of the tiny cohort's four centres over `cohort`, with its initial network (seed 5).
fn federation(dir: &Path, cohort: &Path) -> (Run, Vec<PathBuf>) {
    let run = Run::new(dir, &CENTRES, &round_keys());
    let clients: Vec<PathBuf> = CENTRES
        .iter()
        .map(|(c, _)| run.client_config(c, &cohort.join(c), PREPROCESS))
        .collect();
    crate::common::init_model(
        "mri",
        &dir.join("init.safetensors"),
        &["--config", &clients[0].display().to_string(), "--seed", "5"],
    );
    (run, clients)
}

/// The committed rounds in the (stopped) server's store, and that `server verify` finds nothing wrong.
fn committed(run: &Run) -> Vec<StoredRound> {
    let rounds = Store::open_existing(&run.out()).unwrap().rounds().unwrap();
    let (ok, out, err) = fedslm(&[
        "server",
        "verify",
        "--out",
        &run.out().display().to_string(),
        "--ca",
        &run.dir.join("pki/ca.pem").display().to_string(),
    ]);
    assert!(ok, "verify after a kill:\n{out}{err}");
    rounds
}

fn final_model(run: &Run) -> fedslm_protocol::Weights {
    fedslm_model::load(&run.out().join("mri.safetensors"))
        .unwrap()
        .0
}

#[test]
fn killed_at_every_failpoint_the_run_resumes_and_ends_as_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());

    // The uninterrupted run.
    let plain_dir = tmp.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let (plain, clients) = federation(&plain_dir, &cohort);
    let (out, _) = plain.go(&clients);
    assert!(
        out.contains(&format!("run completed after {ROUNDS} rounds")),
        "{out}"
    );
    let plain_rounds = committed(&plain);
    assert_eq!(plain_rounds.len(), ROUNDS);

    // The same run, killed once at each failpoint; the clients are started once and never restarted.
    let dir = tmp.path().join("killed");
    std::fs::create_dir(&dir).unwrap();
    let (run, clients) = federation(&dir, &cohort);
    let kills = [
        (failpoint::AGGREGATING, 1, 0..=0),
        (failpoint::CHECKPOINT_WRITTEN, 2, 1..=1),
        // The flush may or may not have happened when the process died; either is a consistent store.
        (failpoint::SLED_COMMIT, 3, 2..=3),
        (failpoint::BETWEEN_ROUNDS, 4, 4..=4),
    ];
    let mut server = Some(run.server(&[], &[(failpoint::ENV, "aggregating@1")]));
    let nodes: Vec<_> = clients.iter().map(|c| run.client(c, 30)).collect();
    let mut before: Vec<StoredRound> = Vec::new();
    for (i, (point, round, expected)) in kills.iter().enumerate() {
        let s = match server.take() {
            Some(s) => s,
            None => run.server(&[], &[(failpoint::ENV, &format!("{point}@{round}"))]),
        };
        let reached = format!("failpoint {point} reached at round {round}");
        s.wait_for(|_, err| err.contains(&reached), Duration::from_secs(120));
        if i == kills.len() - 1 {
            // While the server holds the store, status comes from the file it rewrites after each commit.
            let (ok, status, err) = fedslm(&[
                "server",
                "status",
                "--out",
                &run.out().display().to_string(),
            ]);
            assert!(ok, "{err}");
            assert!(status.contains("(server running)"), "{status}");
            assert!(status.contains("4 of 5 rounds committed"), "{status}");
        }
        s.kill();
        let now = committed(&run);
        assert!(
            expected.contains(&now.len()),
            "killed at {point}: {} rounds committed",
            now.len()
        );
        assert_eq!(
            &now[..before.len()],
            &before[..],
            "rounds committed before the kill at {point} are intact"
        );
        before = now;
    }
    let s = run.server(&[], &[]);
    let ended: Vec<(bool, String, String)> = nodes.into_iter().map(|n| n.wait()).collect();
    if let Some((_, out, err)) = ended.iter().find(|(ok, _, _)| !ok) {
        let (server_out, server_err) = s.kill();
        panic!(
            "a client did not see the run through:\n{out}{err}\nthe server:\n{server_out}{server_err}"
        );
    }
    let (ok, out, err) = s.wait();
    assert!(ok, "{out}{err}");
    assert!(out.contains("resuming after round 4"), "{out}");
    assert!(
        out.contains(&format!("run completed after {ROUNDS} rounds")),
        "{out}"
    );

    let rounds = committed(&run);
    assert_eq!(rounds.len(), ROUNDS);
    assert_eq!(&rounds[..before.len()], &before[..]);
    // Every round's model is the uninterrupted run's, byte for byte (the files are named by their hash).
    let hashes = |r: &[StoredRound]| r.iter().map(|r| r.checkpoint.clone()).collect::<Vec<_>>();
    assert_eq!(hashes(&rounds), hashes(&plain_rounds));
    assert_eq!(final_model(&run), final_model(&plain));

    // The audit log tells the story: four resumes, each kill's round tried again.
    let store = Store::open_existing(&run.out()).unwrap();
    let meta = store.meta().unwrap().unwrap();
    assert_eq!(meta.resumes, 4);
    let entries = store.audit_entries().unwrap();
    let kinds: BTreeMap<String, usize> = entries.iter().fold(BTreeMap::new(), |mut m, (_, b)| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        *m.entry(v["event"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    assert_eq!(kinds["run_started"], 1);
    assert_eq!(kinds["run_resumed"], 4);
    assert_eq!(kinds["round_committed"], ROUNDS);
    assert_eq!(kinds["run_finished"], 1);
    assert!(kinds["task_sent"] > 3 * ROUNDS, "{kinds:?}");
}

#[test]
fn a_restart_with_other_settings_is_refused_naming_them_unless_it_is_a_new_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = [("center-a", "train"), ("center-b", "train")];
    let reference = crate::common::reference("clinical");
    let keys = "initial_model = \"init.safetensors\"\nrounds = 30\nround_start_grace_secs = 1\n";
    let run = Run::new(d, &centers, keys);
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|(c, _)| run.client_config(c, &reference.join(c), ""))
        .collect();
    let (out, _) = run.go(&clients);
    assert!(out.contains("run completed after"), "{out}");
    let model = std::fs::read(d.join("out/clinical.safetensors")).unwrap();

    // The same settings again: the run is over; nothing is redone and the model is the same.
    let s = run.server(&[], &[]);
    let (ok, out, err) = s.wait();
    assert!(ok, "{out}{err}");
    assert!(out.contains("already ended"), "{out}");
    assert_eq!(
        std::fs::read(d.join("out/clinical.safetensors")).unwrap(),
        model
    );

    // Other settings: refused, naming each change.
    run.write_server_config(
        &centers,
        "initial_model = \"init.safetensors\"\nrounds = 31\nseed = 9\nround_start_grace_secs = 1\n",
    );
    let (ok, _, err) = fedslm(&[
        "server",
        "--config",
        &d.join("server.toml").display().to_string(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("rounds: 30 -> 31") && err.contains("seed: 42 -> 9"),
        "{err}"
    );
    assert!(err.contains("--new-run"), "{err}");

    // A new run moves the old one aside and starts afresh.
    let s = run.server(&["--new-run"], &[]);
    let clients: Vec<_> = clients.iter().map(|c| run.client(c, 5)).collect();
    for c in clients {
        let (ok, out, err) = c.wait();
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = s.wait();
    assert!(ok, "{out}{err}");
    let archived = std::fs::read_dir(d.join("out"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("store-")
        })
        .count();
    assert_eq!(archived, 1, "the first run's store is kept");
    let store = Store::open_existing(&d.join("out")).unwrap();
    assert_eq!(store.meta().unwrap().unwrap().fingerprint["rounds"], "31");
}

#[test]
fn verify_names_an_edited_audit_entry_and_an_altered_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = [
        ("center-a", "train"),
        ("center-b", "train"),
        ("center-c", "train"),
    ];
    let reference = crate::common::reference("clinical");
    let run = Run::new(
        d,
        &centers,
        "initial_model = \"init.safetensors\"\nrounds = 30\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|(c, _)| run.client_config(c, &reference.join(c), ""))
        .collect();
    run.go(&clients);
    let out = d.join("out").display().to_string();
    let ca = d.join("pki/ca.pem").display().to_string();
    let verify = || fedslm(&["server", "verify", "--out", &out, "--ca", &ca]);
    let (ok, text, err) = verify();
    assert!(ok, "{text}{err}");
    assert!(
        text.contains("verified") && text.contains("the server's certificate"),
        "{text}"
    );
    assert!(
        !text.contains("not signed"),
        "a server that stopped signs its last entries: {text}"
    );

    // One accepted update's centre rewritten in sled itself.
    let (key, original) = {
        let db = sled::open(d.join("out/store")).unwrap();
        let (key, bytes) = db
            .scan_prefix(b"audit/")
            .map(|kv| kv.unwrap())
            .find(|(_, v)| {
                let s = String::from_utf8_lossy(v);
                s.contains("\"update_accepted\"") && s.contains("center-b")
            })
            .expect("an accepted update of center-b");
        let edited = String::from_utf8_lossy(&bytes).replace("center-b", "center-x");
        db.insert(&key, edited.as_bytes()).unwrap();
        db.flush().unwrap();
        (key.to_vec(), bytes.to_vec())
    };
    let seq = u64::from_be_bytes(key[b"audit/".len()..].try_into().unwrap());
    let (ok, text, _) = verify();
    assert!(!ok);
    assert!(
        text.contains(&format!("BAD: audit entry {seq} was altered")),
        "entry {seq}:\n{text}"
    );
    {
        let db = sled::open(d.join("out/store")).unwrap();
        db.insert(&key, original).unwrap();
        db.flush().unwrap();
    }
    assert!(verify().0, "restored");

    // One byte of a checkpoint.
    let rounds = Store::open_existing(&d.join("out"))
        .unwrap()
        .rounds()
        .unwrap();
    let second = &rounds[1];
    let path = d
        .join("out/checkpoints")
        .join(format!("{}.safetensors", second.checkpoint));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, text, _) = verify();
    assert!(!ok);
    assert!(
        text.contains("BAD: round 2's checkpoint") && text.contains(&second.checkpoint),
        "{text}"
    );
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert!(verify().0, "restored");

    // The final model file: its coefficients, then the evaluation its card states.
    let final_path = d.join("out/clinical.safetensors");
    let original = std::fs::read(&final_path).unwrap();
    let (weights, card) = fedslm_model::load(&final_path).unwrap();
    let doubled: Vec<fedslm_protocol::Tensor> = weights
        .tensors()
        .iter()
        .map(|t| {
            let v: Vec<f64> = t.to_f64_vec().iter().map(|x| 2.0 * x).collect();
            fedslm_protocol::Tensor::from_f64(t.name(), t.shape().to_vec(), t.role(), &v).unwrap()
        })
        .collect();
    let doubled = fedslm_protocol::Weights::from_tensors(doubled).unwrap();
    fedslm_model::save(&final_path, &doubled, &card).unwrap();
    let (ok, text, _) = verify();
    assert!(!ok);
    assert!(
        text.contains("BAD: the final model") && text.contains("differs from the last checkpoint"),
        "{text}"
    );
    let mut boasting = card.clone();
    boasting.metrics = serde_json::json!({"round": 1, "internal": {"auc": 0.99}});
    fedslm_model::save(&final_path, &weights, &boasting).unwrap();
    let (ok, text, _) = verify();
    assert!(!ok);
    assert!(
        text.contains("states an evaluation other than the run's last"),
        "{text}"
    );
    std::fs::write(&final_path, original).unwrap();
    assert!(verify().0, "restored");
}

#[test]
fn verify_reads_a_store_on_a_full_disk() {
    // A small tmpfs of its own, in a user and mount namespace (as root, or where unprivileged namespaces are
    // allowed); the run is copied onto it and the disk filled before `server verify` runs there.
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        panic!("this test needs `unshare -rm` and tmpfs mounts (util-linux, Linux namespaces)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let centers = [("center-a", "train"), ("center-b", "train")];
    let reference = crate::common::reference("clinical");
    let run = Run::new(
        d,
        &centers,
        "initial_model = \"init.safetensors\"\nrounds = 30\n",
    );
    crate::common::init_model("clinical", &d.join("init.safetensors"), &[]);
    let clients: Vec<PathBuf> = centers
        .iter()
        .map(|(c, _)| run.client_config(c, &reference.join(c), ""))
        .collect();
    run.go(&clients);
    let script = format!(
        "set -e; mount -t tmpfs -o size=4m tmpfs /mnt; cp -r {out} /mnt/out; \
         dd if=/dev/zero of=/mnt/fill bs=64k 2>/dev/null || true; \
         df -k /mnt | tail -1; {bin} server verify --out /mnt/out --ca {ca}",
        out = d.join("out").display(),
        bin = env!("CARGO_BIN_EXE_fedslm"),
        ca = d.join("pki/ca.pem").display(),
    );
    let verified = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("TMPDIR", d)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verified.stdout);
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "{text}{err}");
    assert!(
        text.contains("read from a copy") && text.contains("verified"),
        "{text}{err}"
    );
}
