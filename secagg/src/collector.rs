//! The server's side of one secure sum: it relays keys and sealed shares, folds masked inputs into one
//! wrapping sum as they arrive (memory: one vector of the sum's length), and, with the revealed shares,
//! removes the masks. It learns each centre's masked input, which is uniformly random to it, and the total.
//!
//! The round machine drives it: [`Collector::take`] for each message, [`Collector::gone`] for a centre that
//! left, and [`Collector::advance`] when [`Collector::waiting`] is empty or the step's deadline has passed.

use std::collections::{BTreeMap, BTreeSet};

use fedslm_protocol::secure::{
    RevealedShare, SealedShare, SecretKind, Secure, SecureBegin, SignedKeys, SurvivorSignature,
    SHARE_LEN,
};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::CenterId;

use crate::crypto::{apply_mask, pair_seed, public_key, self_seed};
use crate::participant::check_begin;
use crate::{fixed, shamir, SecureError};

/// Where a sum stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for each participant's keys.
    Keys,
    /// Waiting for each roster member's sealed shares.
    Shares,
    /// Waiting for masked inputs.
    Masked,
    /// Waiting for signatures over the survivors.
    Consistency,
    /// Waiting for revealed shares.
    Reveal,
    /// The sum is unmasked (or failed).
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Keys => "Keys",
            Stage::Shares => "Shares",
            Stage::Masked => "Masked",
            Stage::Consistency => "Consistency",
            Stage::Reveal => "Reveal",
            Stage::Done => "nothing",
        }
    }
}

/// One secure sum at the server.
pub struct Collector {
    begin: SecureBegin,
    stage: Stage,
    /// Participants still taking part.
    live: BTreeSet<CenterId>,
    /// Who has answered the current stage.
    answered: BTreeSet<CenterId>,
    keys: BTreeMap<CenterId, SignedKeys>,
    /// U1: the roster sent.
    roster: Vec<CenterId>,
    /// Sealed shares waiting for their recipients.
    mail: BTreeMap<CenterId, Vec<SealedShare>>,
    /// U2: who sent its shares.
    sharers: BTreeSet<CenterId>,
    sum: Vec<u128>,
    /// U3: who sent its masked input.
    survivors: BTreeSet<CenterId>,
    signatures: Vec<SurvivorSignature>,
    reveals: BTreeMap<CenterId, Vec<RevealedShare>>,
    /// Each survivor's own AUC, where it released one.
    own_auc: BTreeMap<CenterId, f64>,
}

impl Collector {
    /// A sum over `begin`'s participants; the Begin message is the caller's to send with the task.
    pub fn new(begin: SecureBegin) -> Result<Collector, SecureError> {
        check_begin(&begin)?;
        Ok(Collector {
            live: begin.participants.iter().cloned().collect(),
            sum: Vec::new(),
            begin,
            stage: Stage::Keys,
            answered: BTreeSet::new(),
            keys: BTreeMap::new(),
            roster: Vec::new(),
            mail: BTreeMap::new(),
            sharers: BTreeSet::new(),
            survivors: BTreeSet::new(),
            signatures: Vec::new(),
            reveals: BTreeMap::new(),
            own_auc: BTreeMap::new(),
        })
    }

    pub fn begin(&self) -> &SecureBegin {
        &self.begin
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The survivors (U3), once known: the centres whose inputs are in the sum.
    pub fn survivors(&self) -> &BTreeSet<CenterId> {
        &self.survivors
    }

    /// The AUCs survivors released of their own patients (evaluations only).
    pub fn own_auc(&self) -> &BTreeMap<CenterId, f64> {
        &self.own_auc
    }

    /// The live participants the current stage still waits for.
    pub fn waiting(&self) -> Vec<CenterId> {
        self.expected()
            .into_iter()
            .filter(|c| !self.answered.contains(c))
            .collect()
    }

    /// Who the current stage asks.
    fn expected(&self) -> Vec<CenterId> {
        let of = |set: &dyn Fn(&CenterId) -> bool| {
            self.live.iter().filter(|c| set(c)).cloned().collect()
        };
        match self.stage {
            Stage::Keys => of(&|_| true),
            Stage::Shares => of(&|c| self.roster.contains(c)),
            Stage::Masked => of(&|c| self.sharers.contains(c)),
            Stage::Consistency | Stage::Reveal => of(&|c| self.survivors.contains(c)),
            Stage::Done => Vec::new(),
        }
    }

    /// A participant left (its connection closed, or it was refused): it answers nothing more.
    pub fn gone(&mut self, center: &CenterId) {
        self.live.remove(center);
    }

    /// Takes `center`'s message for the current stage. An error means the message is refused; the caller
    /// drops the centre from the sum ([`Collector::gone`]).
    pub fn take(&mut self, center: &CenterId, msg: Secure) -> Result<(), SecureError> {
        let who = escape_peer(center.as_str());
        if !self.expected().contains(center) || self.answered.contains(center) {
            return Err(SecureError::Step {
                expected: self.stage.name(),
                got: msg.name(),
            });
        }
        match (self.stage, msg) {
            (Stage::Keys, Secure::Keys(k)) => {
                if &k.center != center {
                    return Err(SecureError::Refused(format!(
                        "{who} sent keys in the name of {}",
                        escape_peer(k.center.as_str())
                    )));
                }
                self.keys.insert(center.clone(), k);
            }
            (Stage::Shares, Secure::Shares(shares)) => {
                let mut to = BTreeSet::new();
                for s in &shares {
                    if &s.from != center || !self.roster.contains(&s.to) || !to.insert(&s.to) {
                        return Err(SecureError::Refused(format!(
                            "{who}'s shares are not one for each other centre on the roster"
                        )));
                    }
                }
                if to.len() + 1 != self.roster.len() || to.contains(center) {
                    return Err(SecureError::Refused(format!(
                        "{who} sent shares for {} of the {} other centres on the roster",
                        to.len(),
                        self.roster.len() - 1
                    )));
                }
                for s in shares {
                    self.mail.entry(s.to.clone()).or_default().push(s);
                }
                self.sharers.insert(center.clone());
            }
            (Stage::Masked, Secure::Masked(m)) => {
                if m.values.len() as u64 != self.begin.length {
                    return Err(SecureError::Length {
                        got: m.values.len(),
                        expected: self.begin.length,
                    });
                }
                if let Some(a) = m.own_auc {
                    self.own_auc.insert(center.clone(), a);
                }
                if self.sum.is_empty() {
                    self.sum = m.values.words().collect();
                } else {
                    for (s, v) in self.sum.iter_mut().zip(m.values.words()) {
                        *s = s.wrapping_add(v);
                    }
                }
                self.survivors.insert(center.clone());
            }
            (Stage::Consistency, Secure::Consistency(signature)) => {
                self.signatures.push(SurvivorSignature {
                    center: center.clone(),
                    signature,
                });
            }
            (Stage::Reveal, Secure::Reveal(shares)) => {
                self.reveals.insert(center.clone(), shares);
            }
            (_, other) => {
                return Err(SecureError::Step {
                    expected: self.stage.name(),
                    got: other.name(),
                })
            }
        }
        self.answered.insert(center.clone());
        Ok(())
    }

    fn threshold(&self) -> usize {
        self.begin.threshold as usize
    }

    fn enough(&self, stage: &'static str, have: usize) -> Result<(), SecureError> {
        if have < self.threshold() {
            return Err(SecureError::TooFew {
                stage,
                have,
                threshold: self.threshold(),
            });
        }
        Ok(())
    }

    /// Closes the current stage with the answers it has (all, or those in by its deadline) and returns the
    /// next stage's messages, each for one centre. At the last stage the result is the unmasked sum, from
    /// [`Collector::unmask`]. Fewer than `t` answers end the sum with [`SecureError::TooFew`].
    pub fn advance(&mut self) -> Result<Vec<(CenterId, Secure)>, SecureError> {
        let answered: Vec<CenterId> = self
            .answered
            .iter()
            .filter(|c| self.live.contains(*c))
            .cloned()
            .collect();
        self.answered.clear();
        let out = match self.stage {
            Stage::Keys => {
                self.enough("keys", answered.len())?;
                self.roster = answered;
                let roster: Vec<SignedKeys> =
                    self.roster.iter().map(|c| self.keys[c].clone()).collect();
                self.stage = Stage::Shares;
                self.roster
                    .iter()
                    .map(|c| (c.clone(), Secure::Roster(roster.clone())))
                    .collect()
            }
            Stage::Shares => {
                self.sharers = answered.iter().cloned().collect();
                self.enough("shares", self.sharers.len())?;
                self.stage = Stage::Masked;
                let mut out = Vec::new();
                for c in &self.sharers {
                    let mail: Vec<SealedShare> = self
                        .mail
                        .remove(c)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|s| self.sharers.contains(&s.from))
                        .collect();
                    out.push((c.clone(), Secure::Delivered(mail)));
                }
                self.mail.clear();
                out
            }
            Stage::Masked => {
                // Who sent an input counts, even if it left since: its input is in the sum.
                self.enough("masked inputs", self.survivors.len())?;
                self.stage = Stage::Consistency;
                let list: Vec<CenterId> = self.survivors.iter().cloned().collect();
                self.expected()
                    .into_iter()
                    .map(|c| (c, Secure::Survivors(list.clone())))
                    .collect()
            }
            Stage::Consistency => {
                self.enough("consistency check", self.signatures.len())?;
                self.stage = Stage::Reveal;
                let signed: BTreeSet<&CenterId> =
                    self.signatures.iter().map(|s| &s.center).collect();
                let signers: Vec<CenterId> = self
                    .expected()
                    .into_iter()
                    .filter(|c| signed.contains(c))
                    .collect();
                signers
                    .into_iter()
                    .map(|c| (c, Secure::Unmask(self.signatures.clone())))
                    .collect()
            }
            Stage::Reveal | Stage::Done => Vec::new(),
        };
        Ok(out)
    }

    /// After the Reveal stage: rebuilds each survivor's self-mask seed and each dropout's mask key from the
    /// revealed shares, removes their masks, and returns the sum decoded from fixed point.
    pub fn unmask(&mut self) -> Result<Vec<f64>, SecureError> {
        if self.stage != Stage::Reveal {
            return Err(SecureError::Step {
                expected: self.stage.name(),
                got: "unmask",
            });
        }
        self.stage = Stage::Done;
        self.enough("reveal", self.reveals.len())?;
        let mut seeds: BTreeMap<(CenterId, SecretKind), Vec<[u8; SHARE_LEN]>> = BTreeMap::new();
        for shares in self.reveals.values() {
            for s in shares {
                let wanted = if self.survivors.contains(&s.owner) {
                    SecretKind::SelfMask
                } else {
                    SecretKind::MaskKey
                };
                if s.kind == wanted && self.sharers.contains(&s.owner) {
                    seeds
                        .entry((s.owner.clone(), s.kind))
                        .or_default()
                        .push(s.share);
                }
            }
        }
        let t = self.threshold();
        let rebuild = |owner: &CenterId, kind: SecretKind| -> Result<[u8; 32], SecureError> {
            let shares = seeds.get(&(owner.clone(), kind)).map_or(&[][..], |v| v);
            if shares.len() < t {
                return Err(SecureError::TooFew {
                    stage: "reveal",
                    have: shares.len(),
                    threshold: t,
                });
            }
            shamir::combine(&shares[..t])
        };
        let sum_id = self.begin.sum;
        for u in &self.survivors {
            let seed = rebuild(u, SecretKind::SelfMask)?;
            apply_mask(&self_seed(&seed, &sum_id), &mut self.sum, false);
        }
        for d in self.sharers.difference(&self.survivors) {
            let secret = rebuild(d, SecretKind::MaskKey)?;
            if public_key(&secret) != self.keys[d].mask {
                return Err(SecureError::BadShares(format!(
                    "the mask key rebuilt for {} is not the one it published",
                    escape_peer(d.as_str())
                )));
            }
            for u in &self.survivors {
                let seed = pair_seed(&secret, &self.keys[u].mask, &sum_id)?;
                // u added this mask if u < d, and subtracted it otherwise: undo that.
                apply_mask(&seed, &mut self.sum, u >= d);
            }
        }
        Ok(fixed::decode(
            &std::mem::take(&mut self.sum),
            self.begin.scale_bits,
        ))
    }
}
