//! Named points where a test stops a process (the server, or a node) so that it can kill it exactly there (no
//! sleeps, no races). Every point of every crate is named here, so that a misspelt name is told.
//!
//! For tests only: `FEDSLM_FAILPOINT=NAME` or `NAME@ROUND` makes the process print `failpoint NAME reached at
//! round R` on stderr when it gets there and then stop dead (every other thread goes on, as they would while a
//! process is being killed). Unset, a point costs one read of a value computed once.

use std::io::Write;
use std::sync::OnceLock;

/// The environment variable that arms a failpoint.
pub const ENV: &str = "FEDSLM_FAILPOINT";

/// After a round's checkpoint file is written and renamed, before its record goes into sled.
pub const CHECKPOINT_WRITTEN: &str = "checkpoint-written";
/// After the round's record is in sled's memory, before the flush that commits it.
pub const SLED_COMMIT: &str = "sled-commit";
/// After a round is committed and announced, before the next round's tasks go out.
pub const BETWEEN_ROUNDS: &str = "between-rounds";
/// After an update has been folded into the round's aggregate, before the round closes.
pub const AGGREGATING: &str = "aggregating";

/// At a node: after a release's entry is in the site's privacy ledger (fsynced), before the release is sent.
pub const LEDGER_WRITTEN: &str = "ledger-written";

pub const ALL: [&str; 5] = [
    CHECKPOINT_WRITTEN,
    SLED_COMMIT,
    BETWEEN_ROUNDS,
    AGGREGATING,
    LEDGER_WRITTEN,
];

fn armed() -> Option<&'static (String, Option<u32>)> {
    static ARMED: OnceLock<Option<(String, Option<u32>)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (name, round) = match value.split_once('@') {
                Some((n, r)) => (n.to_string(), r.parse().ok()),
                None => (value, None),
            };
            if !ALL.contains(&name.as_str()) {
                eprintln!(
                    "{ENV} names no failpoint {name:?}; known: {}",
                    ALL.join(", ")
                );
            }
            Some((name, round))
        })
        .as_ref()
}

/// Stops here for good if this point (at this round) is armed.
pub fn hit(name: &str, round: u32) {
    let Some((armed, at)) = armed() else { return };
    if armed != name || at.is_some_and(|r| r != round) {
        return;
    }
    {
        // Released before stopping: the other threads log to stderr.
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "failpoint {name} reached at round {round}");
        let _ = err.flush();
    }
    loop {
        std::thread::park();
    }
}
