//! The Debian package (`tools/package-deb.sh`): built from this build's binary, unpacked, its binary run, its
//! systemd units checked by `systemd-analyze verify` (against the unpacked binary), its example configurations
//! read by the server and the node.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_holds_a_working_binary_verified_units_and_readable_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = run(Command::new("bash")
        .arg(root.join("tools/package-deb.sh"))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_fedslm"),
            "--compression",
            "none",
        ])
        .arg("--out")
        .arg(tmp.path().join("out")));
    let deb = deb.trim();
    let fields = run(Command::new("dpkg-deb").args(["-f", deb, "Package", "Version", "Depends"]));
    assert!(fields.contains("Package: fedslm"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    let unpacked = tmp.path().join("root");
    run(Command::new("dpkg-deb").args(["-x", deb]).arg(&unpacked));
    // The maintainer scripts are valid shell.
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").args(["-e", deb]).arg(&control));
    for script in ["postinst", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    let binary = unpacked.join("usr/bin/fedslm");
    let version = run(Command::new(&binary).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("fedslm {}", env!("CARGO_PKG_VERSION"))
    );

    for (unit, command) in [
        (
            "fedslm-server.service",
            "server --config /etc/fedslm/server.toml",
        ),
        (
            "fedslm-client.service",
            "client --config /etc/fedslm/client.toml",
        ),
    ] {
        let text = std::fs::read_to_string(unpacked.join("lib/systemd/system").join(unit)).unwrap();
        for hardening in [
            "User=fedslm",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/fedslm",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            &format!("ExecStart=/usr/bin/fedslm {command}"),
        ] {
            assert!(text.contains(hardening), "{unit} lacks {hardening}");
        }
        // systemd's own check, with the unit pointing at the unpacked binary: no unknown key, no bad value,
        // an executable command.
        let checked = tmp.path().join(unit);
        std::fs::write(
            &checked,
            text.replace("/usr/bin/fedslm", &binary.display().to_string()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&checked)
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }

    // The example configurations are read by the programs that use them.
    let etc = unpacked.join("etc/fedslm");
    let server = std::fs::read_to_string(etc.join("server.toml.example")).unwrap();
    fedslm_server::ServerConfig::parse(&server, &etc.join("server.toml")).unwrap();
    let client = std::fs::read_to_string(etc.join("client.toml.example")).unwrap();
    fedslm_client::ClientConfig::parse(&client, &etc.join("client.toml")).unwrap();
}
