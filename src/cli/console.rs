//! What a person sees, and where the logs go.
//!
//! A command a person runs and waits for (`simulate`, `train`, `synth`, `bench`, and the short ones) shows its
//! progress bars and its milestones on the terminal, with warnings and errors written above the bars (which
//! are suspended for the line), and writes every log line of the servers and nodes it runs into a log file;
//! `-v` shows those lines on the terminal too, `-q` leaves the final results alone. Where the output is not a
//! terminal (a pipe, CI, a file), bars are not drawn and each milestone is one line. A service (`server`,
//! `client`) logs every event at INFO to standard error, one line each, for its journal. Colour only on a
//! terminal, and never with `NO_COLOR` set.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written: for people, or one JSON object per line (with tracing's fields) for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// A layer writing the lines `filter` passes to `writer` in `format` (colour where `ansi`; never in JSON).
fn layer<W>(format: LogFormat, ansi: bool, writer: W, filter: EnvFilter) -> BoxedLayer
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

/// How much of its work a command shows on the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// The final results alone (and errors).
    Quiet,
    /// Progress, milestones, warnings and errors.
    Normal,
    /// Also every log line.
    Verbose,
}

/// The terminal's one set of bars, and what may be printed above them.
pub struct Console {
    bars: MultiProgress,
    verbosity: Verbosity,
}

static CONSOLE: OnceLock<Console> = OnceLock::new();

/// The process's console (normal verbosity until [`init`] says otherwise).
pub fn console() -> &'static Console {
    CONSOLE.get_or_init(|| Console {
        bars: MultiProgress::new(),
        verbosity: Verbosity::Normal,
    })
}

impl Console {
    /// `bar`, drawn with the others on a terminal; hidden with `-q` (and, by indicatif, off a terminal).
    pub fn add(&self, bar: ProgressBar) -> ProgressBar {
        if self.verbosity == Verbosity::Quiet {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            return bar;
        }
        self.bars.add(bar)
    }

    /// A milestone (a fold's result, a model's summary, where the files are): one line above the bars;
    /// nothing with `-q`.
    pub fn milestone(&self, line: &str) {
        if self.verbosity != Verbosity::Quiet {
            self.bars.suspend(|| println!("{line}"));
        }
    }

    /// The results a command exists for (the final table): printed whatever the verbosity.
    pub fn result(&self, text: &str) {
        self.bars.suspend(|| println!("{text}"));
    }
}

/// Whether standard error takes colour: a terminal, and `NO_COLOR` unset (no-color.org).
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Standard error, written with the bars suspended, so that a log line never breaks one.
struct AboveTheBars;

impl Write for AboveTheBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        console()
            .bars
            .suspend(|| std::io::stderr().write_all(buf))
            .map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `filter` (tracing's EnvFilter syntax), or `RUST_LOG` where it is set.
fn filter_of(filter: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logging for a service: every event that `filter` passes, to standard error, one line each.
pub fn init_service(filter: &str, format: LogFormat) {
    let _ = console();
    let stderr = layer(format, colour(), || AboveTheBars, filter_of(filter));
    let _ = tracing_subscriber::registry().with(vec![stderr]).try_init();
}

/// Logging for a command a person waits for: on standard error, warnings and errors (every line that
/// `filter` passes with `-v`, errors alone with `-q`); every line that `filter` passes into `log_file`, if
/// given (created or truncated).
pub fn init_interactive(
    filter: &str,
    format: LogFormat,
    verbosity: Verbosity,
    log_file: Option<&Path>,
) -> std::io::Result<()> {
    let _ = CONSOLE.set(Console {
        bars: MultiProgress::new(),
        verbosity,
    });
    let shown = match verbosity {
        Verbosity::Quiet => EnvFilter::new("error"),
        Verbosity::Normal => EnvFilter::new("warn"),
        Verbosity::Verbose => filter_of(filter),
    };
    let mut layers = vec![layer(format, colour(), || AboveTheBars, shown)];
    if let Some(path) = log_file {
        let file = Mutex::new(std::fs::File::create(path)?);
        layers.push(layer(format, false, file, filter_of(filter)));
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(())
}
