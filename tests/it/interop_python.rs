//! A peer not written in Rust joins over standard QUIC: `tools/interop/peer.py` (aioquic), written from
//! PROTOCOL.md alone, with the PEM files `fedslm certs` writes.
//!
//! Needs a Python with aioquic: `tools/test.sh` makes one and sets FEDSLM_INTEROP_PYTHON. Without it this test
//! fails rather than pass unseen.

use std::process::Command;

use crate::common::{id, Federation};
use fedslm_certs::RevokeTarget;
use fedslm_protocol::{ErrorCode, PROTOCOL_VERSION};
use fedslm_server::ServerEvent;

fn python() -> String {
    let python = std::env::var("FEDSLM_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import aioquic: run the tests with tools/test.sh, or set FEDSLM_INTEROP_PYTHON \
         to a Python that has aioquic"
    );
    python
}

/// Runs the Python peer as centre `claimed` with `cert_center`'s files; returns its exit code and JSON line.
async fn peer(fed: &Federation, claimed: &str, cert_center: &str, version: u16) -> (i32, String) {
    let python = python();
    let dir = fed.node_dir(cert_center);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/interop/peer.py");
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script)
        .args([
            "--server",
            &fed.addr.to_string(),
            "--server-name",
            "localhost",
        ])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join(format!("{cert_center}.pem")))
        .arg("--key")
        .arg(dir.join(format!("{cert_center}.key")))
        .args(["--center", claimed, "--version", &version.to_string()]);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
        .await
        .expect("python peer hung")
        .expect("python peer did not start");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("peer: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), stdout)
}

#[tokio::test]
async fn an_aioquic_peer_is_admitted_and_refused_like_any_other() {
    let mut fed = Federation::start("").await;
    fed.node("center-a");
    let (code, out) = peer(&fed, "center-a", "center-a", PROTOCOL_VERSION).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        r#"{"kind": "Welcome", "run_id": "run-7", "center": "center-a", "role": "Train", "rounds": 3}"#
    );
    fed.expect_admitted("center-a").await;

    let (code, out) = peer(&fed, "center-b", "center-a", PROTOCOL_VERSION).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("IdentityMismatch"), "{out}");
    let (center, code, _) = fed.expect_refusal().await;
    assert_eq!(
        (center, code),
        (id("center-a"), ErrorCode::IdentityMismatch)
    );

    let (code, out) = peer(&fed, "center-a", "center-a", PROTOCOL_VERSION + 1).await;
    assert_eq!(code, 3, "{out}");
    let other = PROTOCOL_VERSION + 1;
    assert!(
        out.contains(&format!("protocol version {other} is not supported")),
        "{out}"
    );

    fed.pki
        .revoke(&RevokeTarget::Center(id("center-a")))
        .unwrap();
    let (code, _) = peer(&fed, "center-a", "center-a", PROTOCOL_VERSION).await;
    assert_eq!(code, 1);
    match fed
        .expect(|e| matches!(e, ServerEvent::HandshakeFailed { .. }))
        .await
    {
        ServerEvent::HandshakeFailed { alert, .. } => assert_eq!(alert, Some(44)),
        _ => unreachable!(),
    }
}
