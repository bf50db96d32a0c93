//! A centre's side of one secure sum: its keys, its shares, its masked input, and what it reveals. Each method
//! is one step, taken once and in order; every list the server sends is checked before it is used.

use std::collections::{BTreeMap, BTreeSet};

use fedslm_protocol::secure::{
    MaskedInput, MaskedValues, RevealedShare, SealedShare, SecretKind, Secure, SecureBegin,
    SignedKeys, SurvivorSignature, MAX_PARTICIPANTS, MIN_PARTICIPANTS, SHARE_LEN,
};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::CenterId;

use crate::crypto::{
    apply_mask, keys_statement, open, pair_seed, public_key, random32, seal, self_seed,
    survivors_statement,
};
use crate::{fixed, shamir, Federation, SecureError, Signs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Keys sent; waiting for the roster.
    Keys,
    /// Shares sent; waiting for the shares sealed for this centre.
    Shares,
    /// Shares received; waiting for the input.
    Input,
    /// Masked input sent; waiting for the survivors.
    Masked,
    /// Survivors signed; waiting for the signatures to unmask.
    Signed,
    /// Shares revealed: nothing more.
    Revealed,
}

/// The checks every participant makes of a sum's parameters.
pub fn check_begin(begin: &SecureBegin) -> Result<(), SecureError> {
    let n = begin.participants.len();
    let setup = |why: String| Err(SecureError::Setup(why));
    if !(MIN_PARTICIPANTS..=MAX_PARTICIPANTS).contains(&n) {
        return setup(format!(
            "{n} participants; a secure sum needs {MIN_PARTICIPANTS} to {MAX_PARTICIPANTS}"
        ));
    }
    if begin.participants.windows(2).any(|w| w[0] >= w[1]) {
        return setup("the participants are not distinct and in order".into());
    }
    let t = begin.threshold as usize;
    if t <= n / 2 || t > n {
        return setup(format!(
            "a threshold of {t} of {n}: it must be more than half of them (and at most all)"
        ));
    }
    if !fixed::fits(begin.scale_bits, begin.bound, n) {
        return setup(format!(
            "{n} values within ±{:e} at {} fractional bits can wrap around 2^128",
            begin.bound, begin.scale_bits
        ));
    }
    Ok(())
}

/// One centre's state in one sum.
pub struct Participant {
    run: String,
    me: CenterId,
    begin: SecureBegin,
    federation: Federation,
    step: Step,
    cipher: [u8; 32],
    mask: [u8; 32],
    seed: [u8; 32],
    /// The verified keys of every participant on the roster (U1), this centre's included.
    roster: BTreeMap<CenterId, SignedKeys>,
    /// The shares this centre holds of each participant's (self-mask seed, mask key), its own included.
    held: BTreeMap<CenterId, ([u8; SHARE_LEN], [u8; SHARE_LEN])>,
    /// The survivors this centre signed.
    survivors: Vec<CenterId>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("me", &self.me)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// Joins sum `begin` of run `run` as `me`: fresh keys, signed by `signer`; returns the Keys message.
    pub fn begin(
        run: &str,
        me: CenterId,
        begin: SecureBegin,
        federation: Federation,
        signer: &dyn Signs,
    ) -> Result<(Participant, Secure), SecureError> {
        check_begin(&begin)?;
        if !begin.participants.contains(&me) {
            return Err(SecureError::Setup(format!(
                "{me} is not among the sum's participants"
            )));
        }
        let (cipher, mask, seed) = (random32()?, random32()?, random32()?);
        let (cipher_pk, mask_pk) = (public_key(&cipher), public_key(&mask));
        let statement = keys_statement(run, &begin.sum, &me, &cipher_pk, &mask_pk);
        let keys = SignedKeys {
            center: me.clone(),
            certificate: signer.certificate_pem().to_string(),
            cipher: cipher_pk,
            mask: mask_pk,
            signature: signer.sign(&statement)?,
        };
        let p = Participant {
            run: run.to_string(),
            me,
            begin,
            federation,
            step: Step::Keys,
            cipher,
            mask,
            seed,
            roster: BTreeMap::new(),
            held: BTreeMap::new(),
            survivors: Vec::new(),
        };
        Ok((p, Secure::Keys(keys)))
    }

    /// The sum's parameters.
    pub fn sum(&self) -> &SecureBegin {
        &self.begin
    }

    fn expect(&self, step: Step, got: &'static str) -> Result<(), SecureError> {
        if self.step != step {
            return Err(SecureError::Step {
                expected: match self.step {
                    Step::Keys => "Roster",
                    Step::Shares => "Delivered",
                    Step::Input => "the input",
                    Step::Masked => "Survivors",
                    Step::Signed => "Unmask",
                    Step::Revealed => "nothing (the shares are revealed)",
                },
                got,
            });
        }
        Ok(())
    }

    fn threshold(&self) -> usize {
        self.begin.threshold as usize
    }

    fn x_of(&self, center: &CenterId) -> u8 {
        // check_begin: at most 255 participants, so the position plus one is a non-zero byte.
        self.begin
            .participants
            .iter()
            .position(|c| c == center)
            .map_or(0, |i| (i + 1) as u8)
    }

    /// The roster (U1): every key checked against the CA and its signature, this centre's own unchanged;
    /// returns the Shares message, this centre's secrets shared among the roster.
    pub fn roster(&mut self, roster: Vec<SignedKeys>) -> Result<Secure, SecureError> {
        self.expect(Step::Keys, "Roster")?;
        let mut checked = BTreeMap::new();
        for keys in roster {
            let who = escape_peer(keys.center.as_str());
            if !self.begin.participants.contains(&keys.center) {
                return Err(SecureError::Refused(format!(
                    "the roster names {who}, not a participant"
                )));
            }
            if keys.center == self.me {
                if keys.cipher != public_key(&self.cipher) || keys.mask != public_key(&self.mask) {
                    return Err(SecureError::Refused(
                        "the roster carries other keys for this centre than it sent".into(),
                    ));
                }
            } else {
                let statement = keys_statement(
                    &self.run,
                    &self.begin.sum,
                    &keys.center,
                    &keys.cipher,
                    &keys.mask,
                );
                self.federation.check(
                    &keys.center,
                    &keys.certificate,
                    &statement,
                    &keys.signature,
                )?;
                if keys.mask == keys.cipher {
                    return Err(SecureError::Forged {
                        center: who,
                        reason: "its two keys are one".into(),
                    });
                }
            }
            if checked.insert(keys.center.clone(), keys).is_some() {
                return Err(SecureError::Refused(format!(
                    "the roster names {who} twice"
                )));
            }
        }
        if !checked.contains_key(&self.me) {
            return Err(SecureError::Refused(
                "the roster leaves this centre out".into(),
            ));
        }
        if checked.len() < self.threshold() {
            return Err(SecureError::TooFew {
                stage: "keys",
                have: checked.len(),
                threshold: self.threshold(),
            });
        }
        let xs: Vec<u8> = checked.keys().map(|c| self.x_of(c)).collect();
        let mut random_fail = None;
        let mut random = |buf: &mut [u8]| {
            if let Err(e) = crate::crypto::fill(buf) {
                random_fail = Some(e);
            }
        };
        let seed_shares = shamir::split(&self.seed, self.threshold(), &xs, &mut random);
        let mask_shares = shamir::split(&self.mask, self.threshold(), &xs, &mut random);
        if let Some(e) = random_fail {
            return Err(e);
        }
        let mut out = Vec::new();
        for ((to, keys), (s, m)) in checked.iter().zip(seed_shares.iter().zip(&mask_shares)) {
            if *to == self.me {
                self.held.insert(to.clone(), (*s, *m));
                continue;
            }
            out.push(SealedShare {
                from: self.me.clone(),
                to: to.clone(),
                sealed: seal(
                    &self.cipher,
                    &keys.cipher,
                    &self.begin.sum,
                    &self.me,
                    to,
                    (s, m),
                )?,
            });
        }
        self.roster = checked;
        self.step = Step::Shares;
        Ok(Secure::Shares(out))
    }

    /// The shares sealed for this centre (one from each participant that sent its shares: U2).
    pub fn delivered(&mut self, shares: Vec<SealedShare>) -> Result<(), SecureError> {
        self.expect(Step::Shares, "Delivered")?;
        for s in shares {
            let who = escape_peer(s.from.as_str());
            if s.to != self.me {
                return Err(SecureError::Refused(format!(
                    "shares from {who} addressed to another centre"
                )));
            }
            let Some(keys) = self.roster.get(&s.from) else {
                return Err(SecureError::Refused(format!(
                    "shares from {who}, not on the roster"
                )));
            };
            if s.from == self.me || self.held.contains_key(&s.from) {
                return Err(SecureError::Refused(format!("shares from {who} twice")));
            }
            let (seed, mask) = open(
                &self.cipher,
                &keys.cipher,
                &self.begin.sum,
                &s.from,
                &self.me,
                &s.sealed,
            )?;
            if seed[0] != self.x_of(&self.me) || mask[0] != self.x_of(&self.me) {
                return Err(SecureError::Refused(format!(
                    "the shares from {who} are not at this centre's coordinate"
                )));
            }
            self.held.insert(s.from, (seed, mask));
        }
        if self.held.len() < self.threshold() {
            return Err(SecureError::TooFew {
                stage: "shares",
                have: self.held.len(),
                threshold: self.threshold(),
            });
        }
        self.step = Step::Input;
        Ok(())
    }

    /// The centres whose shares this centre holds (U2), itself included.
    pub fn holders(&self) -> impl Iterator<Item = &CenterId> {
        self.held.keys()
    }

    /// This centre's input, encoded and masked: the Masked message, with the figure it releases in the clear
    /// (an evaluation's own AUC), if any. The input must have the sum's length and each element must lie within
    /// its bound.
    pub fn mask(&mut self, input: &[f64], own_auc: Option<f64>) -> Result<Secure, SecureError> {
        self.expect(Step::Input, "the input")?;
        if input.len() as u64 != self.begin.length {
            return Err(SecureError::Length {
                got: input.len(),
                expected: self.begin.length,
            });
        }
        let mut values = fixed::encode(input, self.begin.scale_bits, self.begin.bound)?;
        apply_mask(&self_seed(&self.seed, &self.begin.sum), &mut values, true);
        for other in self.held.keys().filter(|c| **c != self.me) {
            let keys = &self.roster[other];
            let seed = pair_seed(&self.mask, &keys.mask, &self.begin.sum)?;
            // The lower id adds, the higher subtracts: the pair's masks cancel in the sum.
            apply_mask(&seed, &mut values, self.me < *other);
        }
        self.step = Step::Masked;
        Ok(Secure::Masked(MaskedInput {
            values: MaskedValues::from_words(&values),
            own_auc,
        }))
    }

    /// The survivors (U3): those of U2 whose masked input the server says it has, this centre among them;
    /// returns this centre's signature over them.
    pub fn survivors(
        &mut self,
        survivors: Vec<CenterId>,
        signer: &dyn Signs,
    ) -> Result<Secure, SecureError> {
        self.expect(Step::Masked, "Survivors")?;
        let distinct: BTreeSet<&CenterId> = survivors.iter().collect();
        if distinct.len() != survivors.len() {
            return Err(SecureError::Refused(
                "the survivors name a centre twice".into(),
            ));
        }
        if let Some(stranger) = survivors.iter().find(|c| !self.held.contains_key(*c)) {
            return Err(SecureError::Refused(format!(
                "the survivors name {}, whose shares this centre does not hold",
                escape_peer(stranger.as_str())
            )));
        }
        if !distinct.contains(&self.me) {
            return Err(SecureError::Refused(
                "the survivors leave out this centre, which sent its masked input".into(),
            ));
        }
        if survivors.len() < self.threshold() {
            return Err(SecureError::TooFew {
                stage: "masked inputs",
                have: survivors.len(),
                threshold: self.threshold(),
            });
        }
        let statement = survivors_statement(&self.run, &self.begin.sum, &survivors);
        let signature = signer.sign(&statement)?;
        self.survivors = survivors;
        self.step = Step::Signed;
        Ok(Secure::Consistency(signature))
    }

    /// Unmasking: at least `t` participants' signatures over the same survivors this centre signed; returns
    /// a self-mask share for each survivor and a mask-key share for each centre of U2 that is not one. Done
    /// once: a second request is refused, so that no centre's two secrets are ever both revealed.
    pub fn unmask(&mut self, signatures: Vec<SurvivorSignature>) -> Result<Secure, SecureError> {
        self.expect(Step::Signed, "Unmask")?;
        let statement = survivors_statement(&self.run, &self.begin.sum, &self.survivors);
        let mut signers = BTreeSet::new();
        for s in &signatures {
            let who = escape_peer(s.center.as_str());
            if !self.survivors.contains(&s.center) {
                return Err(SecureError::Refused(format!(
                    "a survivors' signature from {who}, not a survivor"
                )));
            }
            let keys = &self.roster[&s.center];
            self.federation
                .check(&s.center, &keys.certificate, &statement, &s.signature)
                .map_err(|_| {
                    SecureError::Refused(format!(
                        "{who}'s signature is not over the survivors this centre signed"
                    ))
                })?;
            signers.insert(&s.center);
        }
        if signers.len() < self.threshold() {
            return Err(SecureError::TooFew {
                stage: "consistency check",
                have: signers.len(),
                threshold: self.threshold(),
            });
        }
        // One share of each centre held, of one kind, chosen by the one survivor list signed; and never again
        // (the step), so that no centre's two secrets are both revealed.
        let mut out = Vec::new();
        for (owner, (seed, mask)) in &self.held {
            let (kind, share) = if self.survivors.contains(owner) {
                (SecretKind::SelfMask, seed)
            } else {
                (SecretKind::MaskKey, mask)
            };
            out.push(RevealedShare {
                owner: owner.clone(),
                kind,
                share: *share,
            });
        }
        self.step = Step::Revealed;
        Ok(Secure::Reveal(out))
    }
}
