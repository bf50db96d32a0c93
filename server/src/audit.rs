//! The audit log's chain, pure: each entry is stored as the JSON bytes of [`Entry`], which names the SHA-256 of
//! the previous entry's bytes; the head is the hash of the last entry's bytes. Changing, removing or reordering
//! any entry breaks a link, and [`check_chain`] names the entry. The store signs the head, so that rewriting the
//! whole chain shows too.

use std::collections::BTreeMap;

use fedslm_protocol::hex::{from_hex, to_hex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Something that happened in a run, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    RunStarted {
        run_id: String,
        software: String,
        /// The settings that decide the run's result.
        fingerprint: BTreeMap<String, String>,
    },
    /// A server started again on a run that had not finished, or had failed.
    RunResumed {
        software: String,
        committed_rounds: u32,
        previous_state: String,
    },
    #[serde(alias = "centre_joined")]
    CenterJoined {
        center: String,
        role: String,
        remote: String,
        /// `quic` or `tcp`; entries written before TLS over TCP existed were all QUIC.
        #[serde(default = "quic")]
        transport: String,
        /// The SHA-256 of the centre's disclosure policy, as its Hello said (hex); empty in older entries.
        #[serde(default)]
        policy_hash: String,
    },
    /// A peer with a valid certificate that was not admitted.
    #[serde(alias = "centre_refused")]
    CenterRefused {
        center: String,
        remote: String,
        reason: String,
    },
    /// A TLS or QUIC handshake that failed (unknown, expired or revoked certificate, or none). Kept for
    /// logs written before failures were counted per interval ([`AuditEvent::HandshakesFailed`]).
    HandshakeFailed {
        remote: String,
        reason: String,
    },
    /// The handshakes that failed or were ignored over `seconds`, counted by reason (a TLS alert's name, a
    /// timeout, a limit), from `addresses` source addresses (`more_addresses`: more than were counted).
    HandshakesFailed {
        seconds: u64,
        total: u64,
        addresses: u64,
        more_addresses: bool,
        by_reason: BTreeMap<String, u64>,
    },
    /// A newer connection with a centre's certificate completed its Hello and took the older one's place;
    /// the older was closed, told why.
    CenterSuperseded {
        center: String,
        previous_remote: String,
        remote: String,
    },
    /// A centre asked for the run's status (its own part in it); answered and closed, never admitted.
    StatusAsked {
        center: String,
        remote: String,
    },
    /// A connected centre whose certificate the CRL now revokes, closed.
    CenterRevoked {
        center: String,
        remote: String,
        serial: String,
    },
    #[serde(alias = "centre_left")]
    CenterLeft {
        center: String,
        reason: String,
    },
    TaskSent {
        round: u32,
        center: String,
        task: u64,
    },
    UpdateAccepted {
        round: u32,
        center: String,
        task: u64,
    },
    UpdateRefused {
        round: u32,
        center: String,
        task: u64,
        reason: String,
    },
    /// A task whose round closed without its answer, or whose centre could not train.
    TaskDropped {
        round: u32,
        center: String,
        task: u64,
        reason: String,
    },
    /// An evaluation round's pooled AUCs (null where a class is missing or nobody reported).
    RoundEvaluated {
        round: u32,
        internal_auc: Option<f64>,
        external_auc: Option<f64>,
        centers: usize,
        /// The validating centres that scored with batch-norm statistics of their own images (AdaBN).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        adapted_batch_norm: Vec<String>,
    },
    RoundCommitted {
        round: u32,
        checkpoint: String,
    },
    /// Under differential privacy, at the run's end: what the centre released as the server received it, and
    /// its ε by the accountant (`crate::privacy`).
    PrivacySpent {
        center: String,
        fits: u64,
        evaluations: u64,
        epsilon: f64,
        delta: f64,
    },
    RunFinished {
        state: String,
        rounds: u32,
        reason: String,
        checkpoint: Option<String>,
    },
}

/// One stored entry. Its bytes (serde_json, fields in this order) are what is hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time_unix_ms: u64,
    /// Hex SHA-256 of the previous entry's bytes; zeros for the first.
    pub prev: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Where the chain ends: the number of entries and the hash of the last one's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub entries: u64,
    pub hash: [u8; 32],
}

impl Head {
    pub const EMPTY: Head = Head {
        entries: 0,
        hash: [0; 32],
    };

    pub fn hex(&self) -> String {
        to_hex(&self.hash)
    }

    /// The next entry's bytes and the head after it.
    pub fn append(&self, event: AuditEvent, time_unix_ms: u64) -> (Vec<u8>, Head) {
        let entry = Entry {
            seq: self.entries,
            time_unix_ms,
            prev: self.hex(),
            event,
        };
        // An enum of strings and numbers always serialises.
        let bytes = serde_json::to_vec(&entry)
            .expect("an audit entry is plain data with string keys: it always serialises");
        let head = Head {
            entries: self.entries + 1,
            hash: Sha256::digest(&bytes).into(),
        };
        (bytes, head)
    }
}

/// The first place where a chain is broken, with the entry to blame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("audit entry {seq} {reason}")]
pub struct ChainError {
    pub seq: u64,
    pub reason: String,
}

/// Walks stored entries (key and bytes, in key order) and returns the head, or the first entry that was changed,
/// removed or inserted. A link `i-1 -> i` that fails is blamed on entry `i-1` (its bytes changed), unless the
/// link `i -> i+1` fails too, which means entry `i` itself was rewritten (its own link field included).
pub fn check_chain<I>(entries: I) -> Result<(Head, Vec<Entry>), ChainError>
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    let mut stored = Vec::new();
    for (expected, (key, bytes)) in entries.into_iter().enumerate() {
        let expected = expected as u64;
        if key != expected {
            return Err(ChainError {
                seq: expected,
                reason: format!("is missing: the next stored entry is {key}"),
            });
        }
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| ChainError {
            seq: key,
            reason: format!("is unreadable: {e}"),
        })?;
        if entry.seq != key {
            return Err(ChainError {
                seq: key,
                reason: format!("is misnumbered: it says it is entry {}", entry.seq),
            });
        }
        stored.push((bytes, entry));
    }
    let hashes: Vec<[u8; 32]> = stored
        .iter()
        .map(|(b, _)| Sha256::digest(b).into())
        .collect();
    let link_ok = |i: usize| -> bool {
        let want = if i == 0 { [0; 32] } else { hashes[i - 1] };
        from_hex(&stored[i].1.prev).as_deref() == Some(&want[..])
    };
    for i in 0..stored.len() {
        if link_ok(i) {
            continue;
        }
        let next_broken = i + 1 < stored.len() && !link_ok(i + 1);
        if i == 0 || next_broken {
            return Err(ChainError {
                seq: i as u64,
                reason: "was altered: its link to the entry before it does not match".into(),
            });
        }
        return Err(ChainError {
            seq: (i - 1) as u64,
            reason: format!(
                "was altered: it hashes to {}, but entry {i} links to {}",
                to_hex(&hashes[i - 1]),
                stored[i].1.prev
            ),
        });
    }
    let head = Head {
        entries: stored.len() as u64,
        hash: hashes.last().copied().unwrap_or([0; 32]),
    };
    Ok((head, stored.into_iter().map(|(_, e)| e).collect()))
}

fn quic() -> String {
    "quic".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u32) -> (Vec<(u64, Vec<u8>)>, Head) {
        let mut head = Head::EMPTY;
        let mut out = Vec::new();
        for round in 0..n {
            let (bytes, next) = head.append(
                AuditEvent::TaskSent {
                    round,
                    center: "center-a".into(),
                    task: u64::from(round),
                },
                1000 + u64::from(round),
            );
            out.push((head.entries, bytes));
            head = next;
        }
        (out, head)
    }

    fn edit(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let s = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(s.contains(from), "{s}");
        s.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn an_intact_chain_gives_its_head_and_entries() {
        let (entries, head) = chain(5);
        let (got, read) = check_chain(entries).unwrap();
        assert_eq!(got, head);
        assert_eq!(read.len(), 5);
        assert_eq!(read[0].prev, "0".repeat(64));
        assert!(matches!(
            read[3].event,
            AuditEvent::TaskSent { round: 3, .. }
        ));
        assert_eq!(check_chain(Vec::new()).unwrap().0, Head::EMPTY);
    }

    #[test]
    fn an_edited_entry_is_named() {
        let (mut entries, _) = chain(6);
        entries[2].1 = edit(&entries[2].1, "center-a", "center-x");
        assert_eq!(check_chain(entries.clone()).unwrap_err().seq, 2);
        // The first entry too.
        let (mut entries, _) = chain(6);
        entries[0].1 = edit(&entries[0].1, "\"task\":0", "\"task\":9");
        assert_eq!(check_chain(entries).unwrap_err().seq, 0);
        // An entry whose link was rewritten to hide an edit of the one before it.
        let (mut entries, _) = chain(6);
        let prev = check_chain(entries.clone()).unwrap().1[3].prev.clone();
        entries[3].1 = edit(&entries[3].1, &prev, &"1".repeat(64));
        assert_eq!(check_chain(entries).unwrap_err().seq, 3);
    }

    #[test]
    fn the_last_entry_changes_the_head_and_removals_are_named() {
        let (mut entries, head) = chain(4);
        entries[3].1 = edit(&entries[3].1, "center-a", "center-b");
        let (got, _) = check_chain(entries).unwrap();
        assert_ne!(got.hash, head.hash, "only the signed head can catch this");

        let (mut entries, _) = chain(4);
        entries.remove(1);
        let e = check_chain(entries).unwrap_err();
        assert_eq!(e.seq, 1);
        assert!(e.to_string().contains("audit entry 1 is missing"), "{e}");

        // Renumbered to hide the gap: the links still break.
        let (mut entries, _) = chain(4);
        entries.remove(1);
        for (i, e) in entries.iter_mut().enumerate() {
            let entry: Entry = serde_json::from_slice(&e.1).unwrap();
            e.0 = i as u64;
            e.1 = serde_json::to_vec(&Entry {
                seq: i as u64,
                ..entry
            })
            .unwrap();
        }
        assert_eq!(check_chain(entries).unwrap_err().seq, 1);
    }
}
