//! `fedslm bench train`: its worker processes, table and ratios, with PyTorch's side played by a stand-in
//! interpreter (the test suite never installs PyTorch).

use std::os::unix::fs::PermissionsExt;

/// The table's rows for `network`: (phase, cells after the phase).
fn rows<'a>(out: &'a str, network: &str) -> Vec<(&'a str, Vec<&'a str>)> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| network"))
    {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if !cells[0].is_empty() {
            inside = cells[0].starts_with(network);
        }
        if inside {
            rows.push((cells[2], cells[3..].to_vec()));
        }
    }
    rows
}

#[test]
fn both_kernel_sets_timed_in_their_own_processes() {
    let (ok, out, err) = crate::common::fedslm(&[
        "bench",
        "train",
        "--arch",
        "small",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--threads",
        "2",
        "--python",
        "none",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("PyTorch not run (--python none)"), "{out}");
    assert!(
        out.contains("| network | threads | phase | fedslm ms | candle ms |"),
        "{out}"
    );
    let rows = rows(&out, "default, 3 x 32 x 32");
    let phases: Vec<&str> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        phases,
        [
            "forward",
            "backward",
            "optimiser",
            "train step",
            "inference",
            "peak RSS MiB"
        ],
        "{out}"
    );
    for (phase, cells) in &rows {
        assert_eq!(cells.len(), 2, "{phase}: {cells:?}");
        for c in cells {
            let v: f64 = c.parse().unwrap_or_else(|_| panic!("{phase}: {c:?}"));
            assert!(v > 0.0, "{phase}: {v}");
        }
    }
    // One step in one round: the step's time holds its three phases' (each printed to 0.05 ms).
    let ms = |phase: &str, col: usize| -> f64 {
        rows.iter().find(|r| r.0 == phase).unwrap().1[col]
            .parse()
            .unwrap()
    };
    for col in 0..2 {
        let parts = ms("forward", col) + ms("backward", col) + ms("optimiser", col);
        assert!(ms("train step", col) >= parts - 0.15, "{out}");
    }
}

#[test]
fn ratios_against_the_pytorch_side() {
    let dir = tempfile::tempdir().unwrap();
    // Answers the version probe, then prints one timing for the network named last, as the script does.
    let fake = dir.path().join("python");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then echo 9.9-stand-in; exit 0; fi\nfor last; do :; done\n\
         name=${last%%:*}\necho \"{\\\"name\\\":\\\"$name\\\",\\\"forward\\\":1,\\\"backward\\\":2,\
         \\\"optimiser\\\":0.5,\\\"step\\\":4,\\\"inference\\\":1,\\\"peak_rss_mib\\\":100}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out, err) = crate::common::fedslm(&[
        "bench",
        "train",
        "--arch",
        "small",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--kernels",
        "fedslm",
        "--python",
        &fake.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("PyTorch 9.9-stand-in"), "{out}");
    let rows = rows(&out, "default, 3 x 32 x 32");
    let (_, step) = rows.iter().find(|r| r.0 == "train step").unwrap();
    // fedslm ms | PyTorch ms | fedslm / PyTorch
    let ours: f64 = step[0].parse().unwrap();
    assert_eq!(step[1], "4.0");
    let ratio: f64 = step[2].parse().unwrap();
    // Both printed figures are rounded: ours to 0.05 ms (0.0125 in the ratio), the ratio to 0.005.
    assert!((ratio - ours / 4.0).abs() <= 0.0126 + 0.0051, "{out}");
    // Each target beside its measurement: at most PyTorch's time.
    let target = out
        .lines()
        .find(|l| l.starts_with("| default, 3 x 32 x 32") && l.contains("| train step | fedslm |"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(target.contains("| <= 1.00 |"), "{target}");
    let verdict = if ours / 4.0 <= 1.0 {
        "| met |"
    } else {
        "| not met |"
    };
    assert!(target.ends_with(verdict), "{target}");
}

#[test]
fn unknown_networks_and_kernel_sets_are_refused() {
    let (ok, _, err) =
        crate::common::fedslm(&["bench", "train", "--arch", "huge", "--python", "none"]);
    assert!(!ok && err.contains("unknown network \"huge\""), "{err}");
    let (ok, _, err) =
        crate::common::fedslm(&["bench", "train", "--kernels", "mkl", "--python", "none"]);
    assert!(!ok && err.contains("unknown kernel set \"mkl\""), "{err}");
}

/// The PyTorch script compiled into the benchmark is valid Python (where Python is installed).
#[test]
fn the_pytorch_script_parses() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench_torch.py");
    match std::process::Command::new("python3")
        .args([
            "-c",
            "import ast, sys; ast.parse(open(sys.argv[1]).read())",
            script,
        ])
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("no python3 ({e}): not checked"),
    }
}

#[test]
fn rounds_are_timed_over_quic_and_tcp_and_with_secure_aggregation_side_by_side() {
    let (ok, out, err) = crate::common::fedslm(&[
        "bench",
        "rounds",
        "--models",
        "small",
        "--centers",
        "3",
        "--rounds",
        "2",
        "--transport",
        "quic,tcp",
        "--secure-aggregation",
    ]);
    assert!(ok, "{out}{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("small, "))
        .map(|l| l.split(", ").collect())
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (r[4], r[5])).collect();
    assert_eq!(
        kinds,
        [
            ("quic", "plain"),
            ("quic", "secure"),
            ("tcp", "plain"),
            ("tcp", "secure")
        ],
        "{out}"
    );
    for row in &rows {
        let seconds: f64 = row[6].parse().unwrap();
        assert!(seconds > 0.0 && seconds.is_finite(), "{out}");
    }
    // No target for the small network; the targets are the 45 MB model's (`fedslm_study::bench::round_target`).
    assert!(
        rows.iter()
            .all(|r| r.len() == 14 && r[9..12] == ["-", "-", "-"]),
        "{out}"
    );
    // The transport's own time for the same bytes, beside the plain QUIC round only.
    let alone: f64 = rows[0][12].parse().unwrap();
    let over: f64 = rows[0][13].parse().unwrap();
    assert!(alone > 0.0 && over > 0.0 && over.is_finite(), "{out}");
    assert!(rows[1..].iter().all(|r| r[12..] == ["-", "-"]), "{out}");
    let ratio: f64 = rows[1][8].parse().unwrap();
    assert!(ratio > 0.0 && ratio.is_finite(), "{out}");
    assert!(
        !err.contains("ERROR"),
        "no error of the benchmark's own making: {err}"
    );
}
