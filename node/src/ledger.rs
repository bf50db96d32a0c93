//! The site's privacy ledger (`privacy.ledger` in client.toml): every differentially private release the node
//! makes (run, round, kind, mechanism and its parameters, the Rényi DP it spends), one JSON line each,
//! appended and fsynced *before* the release is sent. The node reads it back when it starts, and checks each
//! task's cost against the site's budget from it, so that a restart forgets nothing; a release that was
//! recorded but never sent (a crash in between) stays counted, which errs on the side of the patients.
//!
//! The file's first line names the Rényi orders every entry's `rdp` is given at; a `null` there is an order
//! at which the mechanism is unbounded. A last line without its newline is a write that a crash cut short:
//! its release was never sent (the write comes first), so it is dropped, with a warning, and the file cut
//! back to its last whole line. Any other line that does not read is an error that names the file and line.
//!
//! One node writes a site's ledger: [`Ledger::open`] takes an exclusive lock on the file (`flock`), so that a
//! second node of the site, which would spend the same budget unaware of the first, is refused at its start.
//! [`Ledger::read`] reads it without the lock, while the node runs (`fedslm privacy`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fedslm_client::{Budget, PolicyRefusal};
use fedslm_metrics::rdp::{self, Epsilon, DEFAULT_ORDERS};
use fedslm_protocol::DpSgd;
use serde::{Deserialize, Serialize};

/// The first line of a ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    fedslm_privacy_ledger: u32,
    orders: Vec<f64>,
}

/// The Gaussian mechanism of one release: `steps` Poisson-subsampled steps at `sampling_rate`, noise of
/// standard deviation `noise_multiplier` times the sensitivity `clip`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mechanism {
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub clip: f64,
    pub steps: u64,
}

impl Mechanism {
    /// DP-SGD over `epochs` local epochs, or (at sampling rate 1) the Newton statistics' one release.
    pub fn of_task(dp: &DpSgd, epochs: u32) -> Mechanism {
        Mechanism {
            sampling_rate: dp.sample_rate,
            noise_multiplier: dp.noise_multiplier,
            clip: dp.clip,
            steps: dp.steps(epochs).max(1),
        }
    }

    /// Noisy histogram counts: a patient changes one count by one.
    pub fn histogram(noise: f64) -> Mechanism {
        Mechanism {
            sampling_rate: 1.0,
            noise_multiplier: noise,
            clip: 1.0,
            steps: 1,
        }
    }

    /// Its RDP at the ledger's orders.
    pub fn rdp(&self) -> Result<Vec<f64>, rdp::RdpError> {
        rdp::composed(
            self.sampling_rate,
            self.noise_multiplier,
            self.steps,
            &DEFAULT_ORDERS,
        )
    }
}

/// One release, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub run: String,
    pub round: u32,
    /// `fit`, `newton` or `evaluate`.
    pub kind: String,
    pub mechanism: Mechanism,
    /// RDP spent at each of the header's orders; `None`: unbounded at that order.
    pub rdp: Vec<Option<f64>>,
    /// When it was recorded (RFC 3339, UTC).
    pub at: String,
}

/// Why the ledger cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("privacy ledger {}, line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("privacy ledger {}: its orders differ from this version's; keep it and start a new one", path.display())]
    Orders { path: PathBuf },
    #[error("the accountant: {0}")]
    Accountant(#[from] rdp::RdpError),
    #[error(
        "privacy ledger {}: another fedslm node of this site holds it; one node keeps a site's ledger, so that \
         no release goes uncounted", path.display()
    )]
    InUse { path: PathBuf },
    #[error("privacy ledger {}: read without its lock; only the node that holds it records", path.display())]
    ReadOnly { path: PathBuf },
}

/// The ledger, read back; open for appending (and locked) where the node holds it.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    /// `None`: read only ([`Ledger::read`]).
    file: Option<File>,
    entries: Vec<Entry>,
}

/// Locks `file` for this process alone, or says another holds it.
#[cfg(unix)]
fn lock(file: &File, path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this `File` owns and keeps open; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(LedgerError::InUse {
            path: path.to_path_buf(),
        })
    } else {
        Err(LedgerError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    }
}

#[cfg(not(unix))]
fn lock(_: &File, _: &Path) -> Result<(), LedgerError> {
    Ok(())
}

/// RDP values with `+inf` where an entry says `null`.
fn finite_or_inf(rdp: &[Option<f64>]) -> Vec<f64> {
    rdp.iter().map(|r| r.unwrap_or(f64::INFINITY)).collect()
}

impl Ledger {
    /// Reads the ledger at `path` without holding it (a last line cut short, by a crash or by a write under
    /// way, is left out); it cannot record.
    pub fn read(path: &Path) -> Result<Ledger, LedgerError> {
        let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        Ok(Ledger {
            path: path.to_path_buf(),
            file: None,
            entries: parse(path, &text[..whole])?,
        })
    }

    /// Opens the ledger at `path` for this node alone (locked), creating it (and its folder) if there is
    /// none, and reads every entry.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        lock(&file, path)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            file: Some(file),
            entries: Vec::new(),
        };
        if text.is_empty() {
            let header = Header {
                fedslm_privacy_ledger: 1,
                orders: DEFAULT_ORDERS.to_vec(),
            };
            ledger.append_line(&serde_json::to_string(&header).map_err(|e| {
                LedgerError::Line {
                    path: path.to_path_buf(),
                    line: 1,
                    message: e.to_string(),
                }
            })?)?;
            return Ok(ledger);
        }
        let whole = match text.rfind('\n') {
            Some(i) => i + 1,
            None => 0,
        };
        if whole < text.len() {
            tracing::warn!(
                ledger = %path.display(),
                "the last entry was cut short by a crash before its release was sent; dropping it"
            );
            if let Some(file) = &mut ledger.file {
                file.set_len(whole as u64).map_err(io)?;
                file.sync_data().map_err(io)?;
                file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
            }
        }
        ledger.entries = parse(path, &text[..whole])?;
        Ok(ledger)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The RDP spent by `run`'s releases (`None`: by every run), at each order.
    pub fn rdp(&self, run: Option<&str>) -> Vec<f64> {
        let mut total = vec![0.0; DEFAULT_ORDERS.len()];
        for e in self
            .entries
            .iter()
            .filter(|e| run.is_none_or(|r| r == e.run))
        {
            for (t, r) in total.iter_mut().zip(finite_or_inf(&e.rdp)) {
                *t += r;
            }
        }
        total
    }

    /// The ε spent at `delta` by `run` (`None`: by every run).
    pub fn spent(&self, run: Option<&str>, delta: f64) -> Result<Epsilon, LedgerError> {
        Ok(rdp::epsilon(&DEFAULT_ORDERS, &self.rdp(run), delta)?)
    }

    /// The runs recorded, each with its ε at `delta`, in the order they first appear.
    pub fn runs(&self, delta: f64) -> Result<Vec<(String, Epsilon)>, LedgerError> {
        let mut seen = BTreeMap::new();
        let mut order = Vec::new();
        for e in &self.entries {
            if seen.insert(e.run.clone(), ()).is_none() {
                order.push(e.run.clone());
            }
        }
        order
            .into_iter()
            .map(|run| Ok((run.clone(), self.spent(Some(&run), delta)?)))
            .collect()
    }

    /// Whether `run` may spend `cost` (RDP at the ledger's orders) more within `budget`: the run's ε and,
    /// where the site bounds it, the lifetime ε, after the release.
    pub fn check(&self, budget: &Budget, run: &str, cost: &[f64]) -> Result<(), CheckError> {
        let after = |run: Option<&str>| -> Result<(f64, f64), LedgerError> {
            let spent = self.rdp(run);
            let with: Vec<f64> = spent.iter().zip(cost).map(|(s, c)| s + c).collect();
            Ok((
                rdp::epsilon(&DEFAULT_ORDERS, &spent, budget.delta)?.epsilon,
                rdp::epsilon(&DEFAULT_ORDERS, &with, budget.delta)?.epsilon,
            ))
        };
        let (spent, would) = after(Some(run))?;
        if would > budget.epsilon {
            return Err(CheckError::Refused(PolicyRefusal::OverBudget {
                key: "privacy.epsilon",
                spent,
                would,
                budget: budget.epsilon,
                delta: budget.delta,
            }));
        }
        if let Some(lifetime) = budget.lifetime_epsilon {
            let (spent, would) = after(None)?;
            if would > lifetime {
                return Err(CheckError::Refused(PolicyRefusal::OverBudget {
                    key: "privacy.lifetime_epsilon",
                    spent,
                    would,
                    budget: lifetime,
                    delta: budget.delta,
                }));
            }
        }
        Ok(())
    }

    /// Records a release, durably, before it is sent.
    pub fn record(
        &mut self,
        run: &str,
        round: u32,
        kind: &str,
        mechanism: Mechanism,
    ) -> Result<(), LedgerError> {
        let rdp = mechanism
            .rdp()?
            .into_iter()
            .map(|r| r.is_finite().then_some(r))
            .collect();
        let entry = Entry {
            run: run.to_string(),
            round,
            kind: kind.to_string(),
            mechanism,
            rdp,
            at: now(),
        };
        let line = serde_json::to_string(&entry).map_err(|e| LedgerError::Line {
            path: self.path.clone(),
            line: self.entries.len() + 2,
            message: e.to_string(),
        })?;
        self.append_line(&line)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Appends `line` and its newline in one write, and fsyncs the file.
    fn append_line(&mut self, line: &str) -> Result<(), LedgerError> {
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        let Some(file) = &mut self.file else {
            return Err(LedgerError::ReadOnly {
                path: self.path.clone(),
            });
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        file.write_all(&bytes).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

/// What a site has spent, run by run and over all runs, against its budget: `fedslm privacy`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spending {
    pub delta: f64,
    pub runs: Vec<RunSpending>,
    pub lifetime_epsilon: f64,
    /// What the lifetime budget has left; `None` where the site sets none.
    pub lifetime_remaining: Option<f64>,
}

/// One run's spending.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSpending {
    pub run: String,
    pub releases: usize,
    pub epsilon: f64,
    /// What the run's budget has left; `None` where the site requires no DP.
    pub remaining: Option<f64>,
}

impl Ledger {
    /// The spending by run and over all, at the budget's δ (or the default δ where there is no budget).
    pub fn spending(&self, budget: Option<&Budget>) -> Result<Spending, LedgerError> {
        let delta = budget.map_or(fedslm_client::policy::DEFAULT_DELTA, |b| b.delta);
        let runs = self
            .runs(delta)?
            .into_iter()
            .map(|(run, e)| RunSpending {
                releases: self.entries.iter().filter(|x| x.run == run).count(),
                remaining: budget.map(|b| (b.epsilon - e.epsilon).max(0.0)),
                epsilon: e.epsilon,
                run,
            })
            .collect();
        let lifetime = self.spent(None, delta)?.epsilon;
        Ok(Spending {
            delta,
            runs,
            lifetime_epsilon: lifetime,
            lifetime_remaining: budget
                .and_then(|b| b.lifetime_epsilon)
                .map(|l| (l - lifetime).max(0.0)),
        })
    }
}

/// The entries of a ledger's whole lines `text` (its header first), or the first line that does not read.
fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, LedgerError> {
    let bad = |line: usize, message: String| LedgerError::Line {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let Some((_, first)) = lines.next() else {
        return Err(bad(1, "no header".into()));
    };
    let header: Header =
        serde_json::from_str(first).map_err(|e| bad(1, format!("not a ledger's header: {e}")))?;
    if header.orders != DEFAULT_ORDERS {
        return Err(LedgerError::Orders {
            path: path.to_path_buf(),
        });
    }
    let mut entries = Vec::new();
    for (i, line) in lines {
        let entry: Entry = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        if entry.rdp.len() != DEFAULT_ORDERS.len() {
            return Err(bad(
                i + 1,
                format!(
                    "{} RDP values for {} orders",
                    entry.rdp.len(),
                    DEFAULT_ORDERS.len()
                ),
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// A budget check's answer other than yes.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Refused(PolicyRefusal),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(epsilon: f64, lifetime: Option<f64>) -> Budget {
        Budget {
            epsilon,
            lifetime_epsilon: lifetime,
            delta: 1e-5,
        }
    }

    fn sgd() -> Mechanism {
        Mechanism {
            sampling_rate: 0.25,
            noise_multiplier: 1.0,
            clip: 1.0,
            steps: 20,
        }
    }

    #[test]
    fn what_is_recorded_is_read_back_and_counted_per_run_and_over_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site/ledger.jsonl");
        let mut l = Ledger::open(&path).unwrap();
        l.record("run-1", 1, "fit", sgd()).unwrap();
        l.record("run-1", 2, "fit", sgd()).unwrap();
        l.record("run-2", 1, "evaluate", Mechanism::histogram(2.0))
            .unwrap();
        let one = l.spent(Some("run-1"), 1e-5).unwrap().epsilon;
        let all = l.spent(None, 1e-5).unwrap().epsilon;
        drop(l);
        let l = Ledger::open(&path).unwrap();
        assert_eq!(l.entries().len(), 3);
        assert_eq!(l.spent(Some("run-1"), 1e-5).unwrap().epsilon, one);
        assert_eq!(l.spent(None, 1e-5).unwrap().epsilon, all);
        assert!(all > one && one > 0.0);
        // Equal to the accountant's own composition of the same steps.
        let direct = rdp::epsilon(
            &DEFAULT_ORDERS,
            &rdp::composed(0.25, 1.0, 40, &DEFAULT_ORDERS).unwrap(),
            1e-5,
        )
        .unwrap()
        .epsilon;
        assert!((one - direct).abs() < 1e-12 * direct, "{one} {direct}");
        let runs = l.runs(1e-5).unwrap();
        assert_eq!(
            runs.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
            ["run-1", "run-2"]
        );
    }

    #[test]
    fn a_release_over_the_run_or_lifetime_budget_is_refused_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.jsonl")).unwrap();
        let cost = sgd().rdp().unwrap();
        let one = rdp::epsilon(&DEFAULT_ORDERS, &cost, 1e-5).unwrap().epsilon;
        let double: Vec<f64> = cost.iter().map(|c| 2.0 * c).collect();
        let two = rdp::epsilon(&DEFAULT_ORDERS, &double, 1e-5)
            .unwrap()
            .epsilon;
        assert!(
            one < two && two < 2.0 * one,
            "RDP composes below the sum of the ε"
        );
        assert!(l.check(&budget(one * 1.01, None), "r", &cost).is_ok());
        l.record("r", 1, "fit", sgd()).unwrap();
        let e = l.check(&budget(one * 1.01, None), "r", &cost).unwrap_err();
        assert!(e.to_string().contains("privacy.epsilon"), "{e}");
        // Another run has its own per-run budget, but not its own lifetime.
        assert!(l.check(&budget(one * 1.01, None), "s", &cost).is_ok());
        let e = l
            .check(&budget(one * 1.01, Some(0.5 * (one + two))), "s", &cost)
            .unwrap_err();
        assert!(e.to_string().contains("privacy.lifetime_epsilon"), "{e}");
    }

    #[test]
    fn one_node_holds_the_ledger_and_a_reader_sees_it_while_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let mut held = Ledger::open(&path).unwrap();
        held.record("r", 1, "fit", sgd()).unwrap();
        let e = Ledger::open(&path).unwrap_err();
        assert!(matches!(e, LedgerError::InUse { .. }), "{e}");
        let mut read = Ledger::read(&path).unwrap();
        assert_eq!(read.entries().len(), 1);
        assert!(matches!(
            read.record("r", 2, "fit", sgd()),
            Err(LedgerError::ReadOnly { .. })
        ));
        drop(held);
        assert_eq!(Ledger::open(&path).unwrap().entries().len(), 1);
    }

    #[test]
    fn a_cut_short_last_line_is_dropped_and_a_bad_line_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let mut l = Ledger::open(&path).unwrap();
        l.record("r", 1, "fit", sgd()).unwrap();
        drop(l);
        let whole = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{whole}{{\"run\":\"r\",\"rou")).unwrap();
        let mut l = Ledger::open(&path).unwrap();
        assert_eq!(l.entries().len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
        l.record("r", 2, "fit", sgd()).unwrap();
        drop(l);
        assert_eq!(Ledger::open(&path).unwrap().entries().len(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"round\":1", "\"round\":\"one\"", 1)).unwrap();
        let e = Ledger::open(&path).unwrap_err().to_string();
        assert!(e.contains("l.jsonl, line 2"), "{e}");
    }
}
