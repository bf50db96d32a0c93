//! Secure aggregation's frames (kind 13): a tag byte, then the step's fields. Every count is checked against
//! its limit and the bytes there before anything is allocated; the masked input's elements are raw
//! little-endian u128s.

use super::*;

use crate::secure::{
    MaskedInput, RevealedShare, SealedShare, Secure, SecureBegin, SignedKeys, SurvivorSignature,
    MAX_CERTIFICATE_LEN, MAX_PARTICIPANTS, MAX_SIGNATURE_LEN, SEALED_LEN,
};

impl Encode for MaskedInput {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        (self.values.len() as u64).encode(e)?;
        e.writer().write(self.values.as_bytes())?;
        self.own_auc.encode(e)
    }
}

impl Encode for Secure {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.tag().encode(e)?;
        match self {
            Secure::Begin(m) => m.encode(e),
            Secure::Keys(m) => m.encode(e),
            Secure::Roster(m) => m.encode(e),
            Secure::Shares(m) | Secure::Delivered(m) => m.encode(e),
            Secure::Masked(m) => m.encode(e),
            Secure::Survivors(m) => m.encode(e),
            Secure::Consistency(m) => m.encode(e),
            Secure::Unmask(m) => m.encode(e),
            Secure::Reveal(m) => m.encode(e),
        }
    }
}

/// The most elements a masked input may have: as many as the tensor data of a message may hold bytes.
fn max_masked(limits: &Limits) -> u64 {
    limits.max_weights_bytes / 4 + 1024 * 1024
}

pub(super) fn check_secure(m: &Secure, limits: &Limits) -> Result<(), String> {
    let participants = |n: usize| {
        if n > MAX_PARTICIPANTS {
            Err(format!("{n} participants; the limit is {MAX_PARTICIPANTS}"))
        } else {
            Ok(())
        }
    };
    let keys = |k: &SignedKeys| {
        if k.certificate.len() > MAX_CERTIFICATE_LEN || k.signature.len() > MAX_SIGNATURE_LEN {
            Err(format!("the keys of {} are too long", k.center))
        } else {
            Ok(())
        }
    };
    let sealed = |s: &[SealedShare]| {
        participants(s.len())?;
        match s.iter().find(|s| s.sealed.len() != SEALED_LEN) {
            Some(bad) => Err(format!(
                "shares from {} to {}: {} bytes, not {SEALED_LEN}",
                bad.from,
                bad.to,
                bad.sealed.len()
            )),
            None => Ok(()),
        }
    };
    match m {
        Secure::Begin(b) => {
            participants(b.participants.len())?;
            if b.length > max_masked(limits) {
                return Err(format!(
                    "{} elements; the limit is {}",
                    b.length,
                    max_masked(limits)
                ));
            }
            Ok(())
        }
        Secure::Keys(k) => keys(k),
        Secure::Roster(r) => {
            participants(r.len())?;
            r.iter().try_for_each(keys)
        }
        Secure::Shares(s) | Secure::Delivered(s) => sealed(s),
        Secure::Masked(v) if v.values.len() as u64 > max_masked(limits) => Err(format!(
            "{} masked elements; the limit is {}",
            v.values.len(),
            max_masked(limits)
        )),
        Secure::Survivors(s) => participants(s.len()),
        Secure::Consistency(s) if s.len() > MAX_SIGNATURE_LEN => {
            Err(format!("a signature of {} bytes", s.len()))
        }
        Secure::Unmask(s) => {
            participants(s.len())?;
            match s.iter().find(|s| s.signature.len() > MAX_SIGNATURE_LEN) {
                Some(bad) => Err(format!("the signature of {} is too long", bad.center)),
                None => Ok(()),
            }
        }
        Secure::Reveal(r) if r.len() > MAX_PARTICIPANTS => Err(format!(
            "{} shares; the limit is {MAX_PARTICIPANTS}",
            r.len()
        )),
        _ => Ok(()),
    }
}

fn byte_string<D: Decoder>(d: &mut D, what: &str, max: usize) -> Result<Vec<u8>, DecodeError> {
    let len = length(d, what, max as u64)?;
    ensure_available(d, what, len)?;
    let mut buf = vec![0u8; len];
    d.reader().read(&mut buf)?;
    Ok(buf)
}

fn centers<D: Decoder>(d: &mut D, what: &str) -> Result<Vec<CenterId>, DecodeError> {
    list(d, what, MAX_PARTICIPANTS as u64, center)
}

fn signed_keys<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<SignedKeys, DecodeError> {
    Ok(SignedKeys {
        center: center(d)?,
        certificate: text(d, "certificate", MAX_CERTIFICATE_LEN as u32)?,
        cipher: Decode::decode(d)?,
        mask: Decode::decode(d)?,
        signature: byte_string(d, "signature", MAX_SIGNATURE_LEN)?,
    })
}

fn sealed_shares<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Vec<SealedShare>, DecodeError> {
    list(d, "sealed shares", MAX_PARTICIPANTS as u64, |d| {
        let from = center(d)?;
        let to = center(d)?;
        let sealed = byte_string(d, "sealed shares", SEALED_LEN)?;
        if sealed.len() != SEALED_LEN {
            return Err(fail(format!(
                "shares from {from} to {to}: {} bytes, not {SEALED_LEN}",
                sealed.len()
            )));
        }
        Ok(SealedShare { from, to, sealed })
    })
}

fn masked<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<MaskedInput, DecodeError> {
    let max = max_masked(&d.context().limits);
    let len = length(d, "masked input", max)?;
    let bytes = len
        .checked_mul(16)
        .ok_or_else(|| fail(format!("masked input claims {len} elements")))?;
    let values = crate::secure::MaskedValues::from_bytes(frame_bytes(d, "masked input", bytes)?);
    let own_auc: Option<f64> = Decode::decode(d)?;
    if let Some(a) = own_auc {
        if !(0.0..=1.0).contains(&a) {
            return Err(fail(format!("an AUC of {a}")));
        }
    }
    Ok(MaskedInput { values, own_auc })
}

impl Decode<Ctx> for Secure {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let tag = u8::decode(d)?;
        Ok(match tag {
            0 => {
                let sum = Decode::decode(d)?;
                let participants = centers(d, "participants")?;
                let threshold = Decode::decode(d)?;
                let length: u64 = Decode::decode(d)?;
                let max = max_masked(&d.context().limits);
                if length > max {
                    return Err(fail(format!(
                        "a sum of {length} elements; the limit is {max}"
                    )));
                }
                let scale_bits: u8 = Decode::decode(d)?;
                let bound: f64 = Decode::decode(d)?;
                let norm_bound: Option<f64> = Decode::decode(d)?;
                if scale_bits > 100 || !(bound.is_finite() && bound > 0.0) {
                    return Err(fail(format!(
                        "fixed point of {scale_bits} bits with a bound of {bound}"
                    )));
                }
                Secure::Begin(SecureBegin {
                    sum,
                    participants,
                    threshold,
                    length,
                    scale_bits,
                    bound,
                    norm_bound,
                })
            }
            1 => Secure::Keys(signed_keys(d)?),
            2 => Secure::Roster(list(d, "roster", MAX_PARTICIPANTS as u64, signed_keys)?),
            3 => Secure::Shares(sealed_shares(d)?),
            4 => Secure::Delivered(sealed_shares(d)?),
            5 => Secure::Masked(masked(d)?),
            6 => Secure::Survivors(centers(d, "survivors")?),
            7 => Secure::Consistency(byte_string(d, "signature", MAX_SIGNATURE_LEN)?),
            8 => Secure::Unmask(list(d, "signatures", MAX_PARTICIPANTS as u64, |d| {
                Ok(SurvivorSignature {
                    center: center(d)?,
                    signature: byte_string(d, "signature", MAX_SIGNATURE_LEN)?,
                })
            })?),
            9 => Secure::Reveal(list(d, "shares", MAX_PARTICIPANTS as u64, |d| {
                Ok(RevealedShare {
                    owner: center(d)?,
                    kind: Decode::decode(d)?,
                    share: Decode::decode(d)?,
                })
            })?),
            other => return Err(fail(format!("unknown secure-aggregation step {other}"))),
        })
    }
}

#[cfg(test)]
mod secure_tests {
    use super::*;
    use crate::secure::{SecretKind, SHARE_LEN};

    fn id(s: &str) -> CenterId {
        CenterId::new(s).unwrap()
    }

    fn round_trip(m: Secure) {
        let limits = Limits::default();
        let msg = Message::Secure(m);
        let frame = encode(&msg, &limits).unwrap();
        let (back, used) = decode(&frame, &limits).unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(back, msg);
    }

    #[test]
    fn every_secure_step_round_trips() {
        round_trip(Secure::Begin(SecureBegin {
            sum: [7; 16],
            participants: vec![id("a"), id("b"), id("c")],
            threshold: 2,
            length: 12,
            scale_bits: 64,
            bound: 1e9,
            norm_bound: Some(3.5),
        }));
        let keys = SignedKeys {
            center: id("a"),
            certificate: "-----BEGIN CERTIFICATE-----".into(),
            cipher: [1; 32],
            mask: [2; 32],
            signature: vec![3; 70],
        };
        round_trip(Secure::Keys(keys.clone()));
        round_trip(Secure::Roster(vec![keys.clone(), keys]));
        let sealed = SealedShare {
            from: id("a"),
            to: id("b"),
            sealed: vec![9; SEALED_LEN],
        };
        round_trip(Secure::Shares(vec![sealed.clone()]));
        round_trip(Secure::Delivered(vec![sealed]));
        round_trip(Secure::Masked(MaskedInput {
            values: crate::secure::MaskedValues::from_words(&[0, 1, u128::MAX, 1 << 127]),
            own_auc: Some(0.75),
        }));
        round_trip(Secure::Survivors(vec![id("a"), id("c")]));
        round_trip(Secure::Consistency(vec![4; 71]));
        round_trip(Secure::Unmask(vec![SurvivorSignature {
            center: id("c"),
            signature: vec![5; 72],
        }]));
        round_trip(Secure::Reveal(vec![RevealedShare {
            owner: id("b"),
            kind: SecretKind::MaskKey,
            share: [6; SHARE_LEN],
        }]));
    }

    #[test]
    fn a_sealed_share_of_the_wrong_length_and_an_unknown_step_are_refused() {
        let limits = Limits::default();
        let bad = Message::Secure(Secure::Shares(vec![SealedShare {
            from: id("a"),
            to: id("b"),
            sealed: vec![0; SEALED_LEN - 1],
        }]));
        assert!(encode(&bad, &limits).is_err(), "refused where it is made");
        let good = Message::Secure(Secure::Consistency(vec![1, 2]));
        let mut frame = encode(&good, &limits).unwrap();
        frame[HEADER_LEN] = 42;
        let err = decode(&frame, &limits).unwrap_err().to_string();
        assert!(err.contains("unknown secure-aggregation step 42"), "{err}");
    }

    #[test]
    fn a_masked_input_claiming_more_elements_than_its_bytes_is_refused() {
        let limits = Limits::default();
        let m = Message::Secure(Secure::Masked(MaskedInput {
            values: crate::secure::MaskedValues::from_words(&[1, 2, 3]),
            own_auc: None,
        }));
        let mut frame = encode(&m, &limits).unwrap();
        // The element count is the varint after the tag: claim 100 with 3 elements' bytes.
        frame[HEADER_LEN + 1] = 100;
        let err = decode(&frame, &limits).unwrap_err().to_string();
        assert!(err.contains("more than the payload holds"), "{err}");
    }
}
