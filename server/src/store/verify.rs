//! `fedslm server verify`: the audit chain, the signed head and its signer, every round's checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use fedslm_protocol::hex::{from_hex, to_hex};
use sha2::{Digest, Sha256};

use super::{head_message, sha256_file, RunState, SignedHead, Store, StoreError, HEAD_FILE};
use crate::audit::{check_chain, AuditEvent};

/// What [`Store::verify`] found. No problems means the chain, the signature and every checkpoint hold.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub run_id: String,
    pub entries: u64,
    pub head: String,
    /// Entries that the signed head covers.
    pub signed_entries: Option<u64>,
    /// The signer certificate's subject, when checked against a CA.
    pub signer: Option<String>,
    pub rounds: u32,
    pub checkpoints: usize,
    /// A completed run's final checkpoint (its hash), which the final model file must hold.
    pub final_checkpoint: Option<String>,
    /// The run's model kind (its fingerprint's `model`), which names the final model file.
    pub model: Option<String>,
    pub problems: Vec<String>,
}

/// Who may have signed the audit head, for [`Store::verify`].
#[derive(Debug, Clone, Copy)]
pub struct SignerCheck<'a> {
    /// The federation CA certificate.
    pub ca: &'a Path,
    /// The server's name (DNS name or IP address) its certificate must carry; `None`: any.
    pub server_name: Option<&'a str>,
}

impl Store {
    /// Checks the audit chain, the signed head (and, with `signer`, that the server signed it: its certificate
    /// issued by the CA, for server authentication, valid when it signed, naming the server), and every
    /// round's checkpoint. The first broken audit entry and each bad checkpoint are named.
    pub fn verify(
        &self,
        signer_check: Option<SignerCheck<'_>>,
    ) -> Result<VerifyReport, StoreError> {
        let meta = self
            .meta()?
            .ok_or_else(|| StoreError::NoRun(self.out.clone()))?;
        let mut problems = Vec::new();
        let stored = self.audit_entries()?;
        let count = stored.len() as u64;
        let chain = check_chain(stored.iter().cloned());
        let (head, entries) = match chain {
            Ok((head, entries)) => (Some(head), entries),
            Err(e) => {
                problems.push(e.to_string());
                (None, Vec::new())
            }
        };
        let mut signed_entries = None;
        let mut signer = None;
        let head_path = self.out.join(HEAD_FILE);
        match std::fs::read(&head_path) {
            Err(e) => problems.push(format!("{}: {e}", head_path.display())),
            Ok(bytes) => match serde_json::from_slice::<SignedHead>(&bytes) {
                Err(e) => problems.push(format!("{}: {e}", head_path.display())),
                Ok(s) => {
                    let message = head_message(&s.run_id, s.entries, &s.head);
                    match from_hex(&s.signature) {
                        None => problems
                            .push(format!("{}: the signature is not hex", head_path.display())),
                        Some(sig) => {
                            if let Err(e) =
                                fedslm_certs::verify_signature(&s.certificate, &message, &sig)
                            {
                                problems.push(format!("{}: {e}", head_path.display()));
                            }
                        }
                    }
                    if let Some(check) = signer_check {
                        let at = (s.signed_unix_ms / 1000) as i64;
                        match fedslm_certs::server_signer(
                            &s.certificate,
                            check.ca,
                            check.server_name,
                            at,
                        ) {
                            Ok(subject) => signer = Some(subject),
                            Err(e) => problems.push(format!("{}: {e}", head_path.display())),
                        }
                    }
                    if s.run_id != meta.run_id {
                        problems.push(format!(
                            "{}: signed for run {}, the store holds run {}",
                            head_path.display(),
                            s.run_id,
                            meta.run_id
                        ));
                    }
                    if head.is_some() {
                        // The signed head must be an entry of the chain: the last, or one before entries
                        // appended since the last commit.
                        let at = s
                            .entries
                            .checked_sub(1)
                            .and_then(|i| stored.get(i as usize));
                        let hash = at.map(|(_, b)| to_hex(&Sha256::digest(b)));
                        if s.entries > count {
                            problems.push(format!(
                                "the signed head covers {} audit entries but only {count} are stored: \
                                 entries {count} to {} were removed",
                                s.entries,
                                s.entries - 1
                            ));
                        } else if s.entries > 0 && hash.as_deref() != Some(s.head.as_str()) {
                            problems.push(format!(
                                "audit entry {} was altered: it does not match the signed head",
                                s.entries - 1
                            ));
                        }
                    }
                    signed_entries = Some(s.entries);
                }
            },
        }
        let rounds = self.rounds()?;
        let mut committed: BTreeMap<u32, String> = BTreeMap::new();
        for e in &entries {
            if let AuditEvent::RoundCommitted { round, checkpoint } = &e.event {
                committed.insert(*round, checkpoint.clone());
            }
        }
        let mut checkpoints = 0;
        for (i, r) in rounds.iter().enumerate() {
            if r.round != i as u32 + 1 {
                problems.push(format!(
                    "round {} is missing: the next stored round is {}",
                    i + 1,
                    r.round
                ));
                break;
            }
            if head.is_some() && committed.get(&r.round) != Some(&r.checkpoint) {
                problems.push(format!(
                    "round {}'s record names checkpoint {}, its audit entry {}",
                    r.round,
                    r.checkpoint,
                    committed.get(&r.round).map_or("none", String::as_str)
                ));
            }
            let path = self.checkpoint_path(&r.checkpoint);
            match sha256_file(&path) {
                Ok(h) if h == r.checkpoint => checkpoints += 1,
                Ok(h) => problems.push(format!(
                    "round {}'s checkpoint {} was altered: its bytes hash to {h}",
                    r.round,
                    path.display()
                )),
                Err(e) => problems.push(format!("round {}'s checkpoint: {e}", r.round)),
            }
        }
        if meta.state == RunState::Completed
            && meta.final_checkpoint.as_ref() != rounds.last().map(|r| &r.checkpoint)
        {
            problems.push("the final model is not the last round's checkpoint".into());
        }
        Ok(VerifyReport {
            run_id: meta.run_id,
            entries: count,
            head: head.map(|h| h.hex()).unwrap_or_default(),
            signed_entries,
            signer,
            rounds: rounds.len() as u32,
            checkpoints,
            final_checkpoint: meta.final_checkpoint.clone(),
            model: meta.fingerprint.get("model").cloned(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::round_key;
    use super::super::tests::{commit, fingerprint};
    use super::*;
    use fedslm_certs::Signer;

    #[test]
    fn verify_refuses_a_head_signed_by_a_hospitals_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let pki = fedslm_certs::Pki::init(&out.join("pki"), "t", "localhost", &[]).unwrap();
        let files = fedslm_certs::ServerTlsFiles::in_pki(&out.join("pki"));
        let center = fedslm_protocol::CenterId::new("center-a").unwrap();
        let site = out.join("site");
        pki.issue(
            &center,
            &site,
            fedslm_certs::IssueOptions::days(30).unwrap(),
        )
        .unwrap();
        // A hospital's key, issued by the same CA, re-signs the head.
        let signer =
            Signer::from_files(&site.join("center-a.pem"), &site.join("center-a.key")).unwrap();
        let mut store = Store::open(&out.join("run"), Some(signer)).unwrap();
        store.begin("r1", &fingerprint(3), 3, false).unwrap();
        commit(&store, 1, b"one");
        let check = SignerCheck {
            ca: &files.ca,
            server_name: None,
        };
        let report = store.verify(Some(check)).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].contains("is not the server's"),
            "{:?}",
            report.problems
        );
        // Without a CA to check against, only the signature itself is checked.
        assert!(store.verify(None).unwrap().problems.is_empty());
    }

    #[test]
    fn verify_names_an_altered_checkpoint_a_bad_signature_and_a_missing_round() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        fedslm_certs::Pki::init(&out.join("pki"), "t", "localhost", &[]).unwrap();
        let files = fedslm_certs::ServerTlsFiles::in_pki(&out.join("pki"));
        let signer = Signer::from_files(&files.cert, &files.key).unwrap();
        let mut store = Store::open(out, Some(signer)).unwrap();
        store.begin("r1", &fingerprint(3), 3, false).unwrap();
        commit(&store, 1, b"one");
        let h2 = commit(&store, 2, b"two");
        let check = SignerCheck {
            ca: &files.ca,
            server_name: Some("localhost"),
        };
        let ok = store.verify(Some(check)).unwrap();
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!(ok.signed_entries, Some(ok.entries));
        assert!(ok.signer.is_some());

        std::fs::write(store.checkpoint_path(&h2), b"twO").unwrap();
        let report = store.verify(None).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].contains("round 2's checkpoint"),
            "{:?}",
            report.problems
        );

        std::fs::write(store.checkpoint_path(&h2), b"two").unwrap();
        let head_file = out.join(HEAD_FILE);
        let mut signed: SignedHead =
            serde_json::from_slice(&std::fs::read(&head_file).unwrap()).unwrap();
        signed.entries -= 1;
        std::fs::write(&head_file, serde_json::to_vec(&signed).unwrap()).unwrap();
        let report = store.verify(None).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("signature does not match")),
            "{:?}",
            report.problems
        );

        store.db.remove(round_key(1)).unwrap();
        let report = store.verify(None).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("round 1 is missing")),
            "{:?}",
            report.problems
        );
    }
}
