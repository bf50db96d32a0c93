//! What a person sees: `fedslm simulate` in a pseudo-terminal draws its progress and prints its milestones and
//! no log line, while its log file holds every round of every federation; off a terminal, one line per
//! milestone and no cursor movement; colour only on a terminal and never with `NO_COLOR`.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

const ROWS: u16 = 400;
const COLS: u16 = 160;

/// `fedslm simulate` of the clinical model over the reference centres, two folds, no baseline, into `out`.
fn simulate_args(out: &Path) -> Vec<String> {
    [
        "simulate",
        "--cohort",
        &crate::common::reference("clinical").display().to_string(),
        "--models",
        "clinical",
        "--holdout",
        "none",
        "--folds",
        "2",
        "--no-centralised",
        "--out",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the binary with `args` on a pseudo-terminal of `ROWS` x `COLS` (its stdin, stdout and stderr); returns
/// whether it succeeded and every byte it wrote to the terminal.
fn in_a_terminal(args: &[String], env: &[(&str, &str)]) -> (bool, Vec<u8>) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: ROWS,
        ws_col: COLS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes the two descriptors it opens; the name and termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedslm"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // The parent's copies of the terminal's slave end go with the command, so that reading the master ends
    // (EIO) once the child has exited.
    drop(cmd);
    let mut screen = Vec::new();
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 65536];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => screen.extend_from_slice(&buf[..n]),
        }
    }
    (child.wait().unwrap().success(), screen)
}

/// What a terminal of `ROWS` x `COLS` shows after `bytes`.
fn screen_of(bytes: &[u8]) -> String {
    let mut parser = vt100::Parser::new(ROWS, COLS, 0);
    parser.process(bytes);
    parser.screen().contents()
}

/// Rounds committed in every federation of the run in `out`, from their stores.
fn rounds_stored(out: &Path) -> usize {
    let mut n = 0;
    for run in std::fs::read_dir(out.join("runs/clinical")).unwrap() {
        let rounds = run.unwrap().path().join("rounds.jsonl");
        if rounds.is_file() {
            n += std::fs::read_to_string(rounds).unwrap().lines().count();
        }
    }
    n
}

/// An ANSI SGR sequence (colour, bold): ESC [ digits and semicolons, then `m`.
fn has_colour(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(i, w)| {
        w == b"\x1b["
            && bytes[i + 2..]
                .iter()
                .position(|b| !(b.is_ascii_digit() || *b == b';'))
                .is_some_and(|end| bytes[i + 2 + end] == b'm')
    })
}

#[test]
fn on_a_terminal_a_person_sees_progress_and_milestones_and_the_log_file_gets_every_round() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim");
    let (ok, bytes) = in_a_terminal(&simulate_args(&out), &[]);
    let screen = screen_of(&bytes);
    assert!(ok, "{screen}");
    let raw = String::from_utf8_lossy(&bytes);
    // The progress was drawn (a federation's rounds bar), then cleared.
    assert!(raw.contains("clinical fold 1/2 round"), "{raw:?}");
    // The milestones and the table stay on the screen, and no log line ever reached it.
    let log = out.canonicalize().unwrap().join("fedslm.log");
    for milestone in [
        format!("log: {}", log.display()),
        "clinical fold 1/2: ".to_string(),
        "clinical fold 2/2: ".to_string(),
        "clinical all data: ".to_string(),
        "wall time".to_string(),
        format!("every line the servers and nodes logged: {}", log.display()),
    ] {
        assert!(
            screen.contains(&milestone),
            "{milestone:?} not on\n{screen}"
        );
    }
    for line in [" INFO ", "fedslm_server", "fedslm_client"] {
        assert!(!raw.contains(line), "{line:?} on the terminal:\n{screen}");
    }
    // The log file has every round of every federation, as the servers logged them.
    let logged = std::fs::read_to_string(&log).unwrap();
    let committed = logged.matches("round committed").count();
    assert!(committed > 0, "{logged}");
    assert_eq!(committed, rounds_stored(&out), "{logged}");
    assert!(logged.contains("fedslm_client"), "the nodes' lines too");
    assert!(!has_colour(logged.as_bytes()), "no colour in a file");
}

#[test]
fn off_a_terminal_each_milestone_is_one_line_and_nothing_moves_the_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim");
    let run = Command::new(env!("CARGO_BIN_EXE_fedslm"))
        .args(simulate_args(&out))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}{stderr}");
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains('\r') && !text.contains('\x1b'),
            "no bars, no escapes:\n{text:?}"
        );
    }
    assert!(stderr.trim().is_empty(), "no log lines: {stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines[0].starts_with("log: "), "{stdout}");
    assert!(
        lines[lines.len() - 1].starts_with("every line the servers and nodes logged: "),
        "{stdout}"
    );
    // A federation's milestones, each on a line of its own, in order.
    let fold = |k: usize| {
        lines
            .iter()
            .position(|l| l.starts_with(&format!("clinical fold {k}/2: ")))
            .unwrap_or_else(|| panic!("fold {k}:\n{stdout}"))
    };
    assert!(fold(1) < fold(2), "{stdout}");
    assert!(lines.iter().any(|l| l.starts_with("wall time")), "{stdout}");
}

#[test]
fn with_v_the_log_lines_show_coloured_on_a_terminal_and_plain_with_no_color() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["-v".to_string()];
    args.extend(simulate_args(&tmp.path().join("a")));
    let (ok, coloured) = in_a_terminal(&args, &[]);
    assert!(ok, "{}", screen_of(&coloured));
    let screen = screen_of(&coloured);
    assert!(screen.contains("round committed"), "{screen}");
    assert!(has_colour(&coloured), "{screen}");

    let mut args = vec!["-v".to_string()];
    args.extend(simulate_args(&tmp.path().join("b")));
    let (ok, plain) = in_a_terminal(&args, &[("NO_COLOR", "1")]);
    assert!(ok, "{}", screen_of(&plain));
    assert!(screen_of(&plain).contains("round committed"));
    assert!(!has_colour(&plain), "{:?}", String::from_utf8_lossy(&plain));
}

#[test]
fn with_q_the_table_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["-q".to_string()];
    args.extend(simulate_args(&tmp.path().join("sim")));
    let run = Command::new(env!("CARGO_BIN_EXE_fedslm"))
        .args(&args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    assert!(!stdout.contains("fold 1/2"), "{stdout}");
    assert!(!stdout.contains("log: "), "{stdout}");
    assert!(stdout.contains("clinical"), "the table: {stdout}");
}

#[test]
fn with_log_format_json_every_log_line_is_a_json_object_with_its_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim");
    let mut args = vec!["--log-format".to_string(), "json".to_string()];
    args.extend(simulate_args(&out));
    let run = Command::new(env!("CARGO_BIN_EXE_fedslm"))
        .args(&args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let logged = std::fs::read_to_string(out.join("fedslm.log")).unwrap();
    let mut committed = 0;
    for line in logged.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "round committed" {
            assert!(v["fields"]["round"].as_u64().is_some(), "{line}");
            committed += 1;
        }
    }
    assert_eq!(committed, rounds_stored(&out));
}
