//! The progress bars a person watches, in one style. Each is drawn once [`super::console::Console::add`] has
//! placed it with the others: until then it draws nothing (a line drawn outside the console's set could not be
//! cleared for a line printed above them).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn bar(len: u64, template: &str) -> ProgressBar {
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden()).with_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    )
}

/// Epochs of training, the current fit as its message.
pub fn epochs_bar() -> ProgressBar {
    bar(
        0,
        "{msg:>22} [{bar:30}] {pos}/{len} epochs, {elapsed} (eta {eta})",
    )
}

/// A federation's rounds, named by its prefix, the last round's summary as its message.
pub fn rounds_bar(label: &str, rounds: u32) -> ProgressBar {
    let b = bar(
        u64::from(rounds),
        "{prefix:>18} round {pos}/{len} [{bar:25}] {elapsed} {msg}",
    );
    b.set_prefix(label.to_string());
    b
}

/// Patients written.
pub fn patients_bar(total: u64) -> ProgressBar {
    bar(total, "{msg} [{bar:40}] {pos}/{len} patients, {eta} left")
}

/// A benchmark's phases, the current one as its message.
pub fn phases_bar(phases: u64) -> ProgressBar {
    bar(phases, "phase {pos}/{len} [{bar:20}] {elapsed} {msg}")
}

/// Timed runs of a benchmark.
pub fn timings_bar(runs: u64) -> ProgressBar {
    bar(runs, "[{bar:30}] {pos}/{len} networks timed, {elapsed}")
}

/// A service's one status line on a terminal: what happened last.
pub fn status_line() -> ProgressBar {
    let b = bar(0, "{spinner} {elapsed} {msg}");
    b.enable_steady_tick(std::time::Duration::from_millis(500));
    b
}
