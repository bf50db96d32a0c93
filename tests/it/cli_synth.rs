//! `fedslm synth` from the shell.

use crate::common::fedslm;

#[test]
fn writes_a_cohort_that_inspect_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cohort");
    let o = out.to_str().unwrap();
    let (ok, stdout, err) = fedslm(&["synth", "--out", o, "--preset", "tiny", "--seed", "3"]);
    assert!(ok, "{err}");
    for c in ["center-a", "center-b", "center-c", "external"] {
        assert!(stdout.contains(c), "{stdout}");
        let m = out.join(c).join("manifest.csv");
        let (ok, summary, err) = fedslm(&["inspect", m.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(summary.contains("images          T2W"), "{summary}");
    }
    let (ok, _, err) = fedslm(&["synth", "--out", o, "--preset", "tiny"]);
    assert!(
        !ok && err.contains("already holds a synthetic cohort"),
        "{err}"
    );

    let part = tmp.path().join("part");
    let (ok, stdout, err) = fedslm(&[
        "synth",
        "--out",
        part.to_str().unwrap(),
        "--preset",
        "tiny",
        "--partition",
        "iid",
        "--centers",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("site-03") && !stdout.contains("site-04"),
        "{stdout}"
    );
}

#[test]
fn bad_arguments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("x");
    let o = o.to_str().unwrap();
    let (ok, _, err) = fedslm(&["synth", "--out", o, "--preset", "huge"]);
    assert!(!ok && err.contains("unknown preset \"huge\""), "{err}");
    let (ok, _, err) = fedslm(&["synth", "--out", o, "--partition", "dirichlet:-1"]);
    assert!(!ok && err.contains("needs a positive alpha"), "{err}");
    let (ok, _, err) = fedslm(&["synth", "--out", o, "--centers", "center-q"]);
    assert!(!ok && err.contains("no centre \"center-q\""), "{err}");
    let (ok, _, err) = fedslm(&[
        "synth",
        "--out",
        o,
        "--partition",
        "iid",
        "--centers",
        "many",
    ]);
    assert!(
        !ok && err.contains("the number of virtual centres"),
        "{err}"
    );
}
