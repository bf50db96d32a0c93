//! `fedslm certs` from the shell, as README.md shows it, and its errors for the usual mistakes.

use std::path::Path;

use crate::common::fedslm_in;

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, out, err) = fedslm_in(dir, args);
    assert!(success, "{args:?}: {err}");
    out
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let (success, _, err) = fedslm_in(dir, args);
    assert!(!success, "{args:?} succeeded");
    err
}

#[test]
fn the_readme_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(
        d,
        &[
            "certs",
            "init",
            "--out",
            "pki",
            "--federation",
            "rectal-slm",
            "--server-name",
            "fl.example-hospital.org",
            "--server-ip",
            "10.0.0.5",
        ],
    );
    let out = ok(
        d,
        &["certs", "request", "--center", "center-b", "--out", "certs"],
    );
    assert!(
        out.contains("certs/center-b.key") && out.contains("certs/center-b.csr"),
        "{out}"
    );
    std::fs::copy(d.join("certs/center-b.csr"), d.join("center-b.csr")).unwrap();
    let out = ok(
        d,
        &[
            "certs",
            "sign",
            "--pki",
            "pki",
            "--csr",
            "center-b.csr",
            "--center",
            "center-b",
            "--out",
            "center-b.pem",
            "--days",
            "365",
        ],
    );
    assert!(out.contains("certificate for centre center-b"), "{out}");
    ok(
        d,
        &[
            "certs", "issue", "--pki", "pki", "--center", "center-a", "--out", "nodes", "--days",
            "365",
        ],
    );
    for f in [
        "nodes/center-a.pem",
        "nodes/center-a.key",
        "nodes/ca.pem",
        "center-b.pem",
    ] {
        assert!(d.join(f).is_file(), "{f}");
    }
    ok(
        d,
        &[
            "certs", "issue", "--pki", "pki", "--center", "external", "--out", "nodes", "--days",
            "10",
        ],
    );

    let list = ok(d, &["certs", "list", "--pki", "pki"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    // Soonest expiry first, with a warning within 30 days.
    assert!(
        lines[1].starts_with("external") && lines[1].contains("WARNING: expires in 9 days"),
        "{list}"
    );
    assert!(
        lines[2].starts_with("center-") && lines[2].ends_with("valid"),
        "{list}"
    );

    let serial = list
        .lines()
        .find(|l| l.starts_with("center-a"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    ok(
        d,
        &["certs", "revoke", "--pki", "pki", "--center", "center-b"],
    );
    ok(d, &["certs", "revoke", "--pki", "pki", "--serial", &serial]);
    let list = ok(d, &["certs", "list", "--pki", "pki"]);
    assert_eq!(list.matches("revoked").count(), 2, "{list}");
    assert!(
        list.lines()
            .find(|l| l.starts_with("external"))
            .unwrap()
            .contains("WARNING"),
        "{list}"
    );
}

#[test]
fn mistakes_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let e = fails(
        d,
        &[
            "certs", "issue", "--pki", "nowhere", "--center", "center-a", "--out", "n",
        ],
    );
    assert!(
        e.contains(
            "PKI folder nowhere does not exist; create it with `fedslm certs init --out nowhere`"
        ),
        "{e}"
    );

    ok(
        d,
        &[
            "certs",
            "init",
            "--out",
            "pki",
            "--federation",
            "f",
            "--server-name",
            "localhost",
        ],
    );
    let e = fails(
        d,
        &[
            "certs",
            "init",
            "--out",
            "pki",
            "--federation",
            "f",
            "--server-name",
            "localhost",
        ],
    );
    assert!(e.contains("pki already exists"), "{e}");

    let e = fails(
        d,
        &[
            "certs", "issue", "--pki", "pki", "--center", "Center_A", "--out", "n",
        ],
    );
    assert!(e.contains("centre id \"Center_A\" contains 'C'; only lowercase letters, digits and '-' are allowed"), "{e}");

    ok(
        d,
        &[
            "certs", "issue", "--pki", "pki", "--center", "center-a", "--out", "n",
        ],
    );
    let e = fails(
        d,
        &["certs", "revoke", "--pki", "pki", "--center", "center-q"],
    );
    assert!(
        e.contains("no certificate was issued to centre center-q; issued centres: center-a"),
        "{e}"
    );

    std::fs::write(d.join("bad.csr"), "hello").unwrap();
    let e = fails(
        d,
        &[
            "certs", "sign", "--pki", "pki", "--csr", "bad.csr", "--center", "center-b", "--out",
            "b.pem",
        ],
    );
    assert!(
        e.contains("bad.csr is not a valid certificate signing request"),
        "{e}"
    );
    let e = fails(
        d,
        &[
            "certs",
            "sign",
            "--pki",
            "pki",
            "--csr",
            "missing.csr",
            "--center",
            "center-b",
            "--out",
            "b.pem",
        ],
    );
    assert!(e.contains("cannot read missing.csr"), "{e}");

    let e = fails(
        d,
        &[
            "certs", "issue", "--pki", "pki", "--center", "center-b", "--out", "n", "--days", "0",
        ],
    );
    assert!(e.contains("--days must be between 1 and"), "{e}");
    let e = fails(d, &["certs", "revoke", "--pki", "pki"]);
    assert!(e.contains("--serial"), "{e}");
}

#[test]
fn a_site_asking_for_another_center_gets_the_one_the_coordinator_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(
        d,
        &[
            "certs",
            "init",
            "--out",
            "pki",
            "--federation",
            "f",
            "--server-name",
            "localhost",
        ],
    );
    ok(
        d,
        &["certs", "request", "--center", "center-a", "--out", "site"],
    );
    let (success, _, err) = fedslm_in(
        d,
        &[
            "certs",
            "sign",
            "--pki",
            "pki",
            "--csr",
            "site/center-a.csr",
            "--center",
            "center-c",
            "--out",
            "c.pem",
        ],
    );
    assert!(success, "{err}");
    assert!(
        err.contains(
            "the request asked for centre center-a; the certificate is issued to center-c"
        ),
        "{err}"
    );
    let list = ok(d, &["certs", "list", "--pki", "pki"]);
    assert!(
        list.contains("center-c") && !list.contains("center-a"),
        "{list}"
    );
}
