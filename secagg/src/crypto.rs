//! The primitives: X25519 key agreement (x25519-dalek), HKDF-SHA256 and ChaCha20-Poly1305 (ring), and the
//! ChaCha20 keystream that expands a 32-byte seed into a mask. Every derived key names the sum and what it is
//! for, so that no key serves two purposes or two sums.

use fedslm_protocol::secure::{SEALED_LEN, SHARE_LEN, SUM_ID_LEN};
use fedslm_protocol::CenterId;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::SecureError;

/// 32 bytes from the operating system's generator.
pub fn random32() -> Result<[u8; 32], SecureError> {
    let mut out = [0u8; 32];
    fill(&mut out)?;
    Ok(out)
}

/// Fills `buf` from the operating system's generator.
pub fn fill(buf: &mut [u8]) -> Result<(), SecureError> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| SecureError::Random)
}

/// The X25519 public key of `secret`.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// The shared secret of `secret` and `public`, refused where it is all zeros (a low-order public key, which
/// would make the "secret" known to anyone).
fn agree(secret: &[u8; 32], public: &[u8; 32]) -> Result<[u8; 32], SecureError> {
    let shared = StaticSecret::from(*secret).diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(SecureError::WeakKey);
    }
    Ok(shared.to_bytes())
}

struct Len32;

impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// HKDF-SHA256 of `ikm`, salted with the sum's id, for `info`.
fn derive(ikm: &[u8; 32], sum: &[u8; SUM_ID_LEN], info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Salt::new(HKDF_SHA256, sum)
        .extract(ikm)
        .expand(info, Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The seed of the pairwise mask between the owner of `secret` and the owner of `public` in sum `sum`: the
/// same from either side.
pub fn pair_seed(
    secret: &[u8; 32],
    public: &[u8; 32],
    sum: &[u8; SUM_ID_LEN],
) -> Result<[u8; 32], SecureError> {
    Ok(derive(
        &agree(secret, public)?,
        sum,
        &[b"fedslm secagg pairwise mask"],
    ))
}

/// The seed of a participant's self-mask from its secret `seed`.
pub fn self_seed(seed: &[u8; 32], sum: &[u8; SUM_ID_LEN]) -> [u8; 32] {
    derive(seed, sum, &[b"fedslm secagg self mask"])
}

/// Adds (or subtracts) the ChaCha20 keystream of `seed`, read as little-endian u128s, to `values`, mod 2^128.
pub fn apply_mask(seed: &[u8; 32], values: &mut [u128], add: bool) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 16 * 512];
    for part in values.chunks_mut(512) {
        let bytes = &mut block[..16 * part.len()];
        rng.fill_bytes(bytes);
        for (v, b) in part.iter_mut().zip(bytes.chunks_exact(16)) {
            let mut w = [0u8; 16];
            w.copy_from_slice(b);
            let m = u128::from_le_bytes(w);
            *v = if add {
                v.wrapping_add(m)
            } else {
                v.wrapping_sub(m)
            };
        }
    }
}

fn share_key(
    secret: &[u8; 32],
    public: &[u8; 32],
    sum: &[u8; SUM_ID_LEN],
    from: &CenterId,
    to: &CenterId,
) -> Result<LessSafeKey, SecureError> {
    // The direction is in the derivation: u's shares for v and v's for u are sealed under different keys,
    // so the fixed nonce never repeats under one key.
    let key = derive(
        &agree(secret, public)?,
        sum,
        &[
            b"fedslm secagg shares",
            from.as_str().as_bytes(),
            &[0],
            to.as_str().as_bytes(),
        ],
    );
    Ok(LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte ChaCha20-Poly1305 key"),
    ))
}

fn aad(from: &CenterId, to: &CenterId) -> Vec<u8> {
    [from.as_str().as_bytes(), &[0], to.as_str().as_bytes()].concat()
}

/// `from`'s two shares for `to`, sealed with the key agreed from `from`'s cipher secret and `to`'s cipher key.
pub fn seal(
    secret: &[u8; 32],
    public: &[u8; 32],
    sum: &[u8; SUM_ID_LEN],
    from: &CenterId,
    to: &CenterId,
    shares: (&[u8; SHARE_LEN], &[u8; SHARE_LEN]),
) -> Result<Vec<u8>, SecureError> {
    let key = share_key(secret, public, sum, from, to)?;
    let mut buf = Vec::with_capacity(SEALED_LEN);
    buf.extend_from_slice(shares.0);
    buf.extend_from_slice(shares.1);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(aad(from, to)),
        &mut buf,
    )
    .map_err(|_| SecureError::Seal)?;
    Ok(buf)
}

/// The two shares `from` sealed for `to`: `secret` is `to`'s cipher secret, `public` `from`'s cipher key.
pub fn open(
    secret: &[u8; 32],
    public: &[u8; 32],
    sum: &[u8; SUM_ID_LEN],
    from: &CenterId,
    to: &CenterId,
    sealed: &[u8],
) -> Result<([u8; SHARE_LEN], [u8; SHARE_LEN]), SecureError> {
    let key = share_key(secret, public, sum, from, to)?;
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad(from, to)),
            &mut buf,
        )
        .map_err(|_| SecureError::Unsealed {
            from: from.to_string(),
        })?;
    if plain.len() != 2 * SHARE_LEN {
        return Err(SecureError::Unsealed {
            from: from.to_string(),
        });
    }
    let mut a = [0u8; SHARE_LEN];
    let mut b = [0u8; SHARE_LEN];
    a.copy_from_slice(&plain[..SHARE_LEN]);
    b.copy_from_slice(&plain[SHARE_LEN..]);
    Ok((a, b))
}

/// What a centre signs with its certificate key to vouch for its keys in one sum.
pub fn keys_statement(
    run: &str,
    sum: &[u8; SUM_ID_LEN],
    center: &CenterId,
    cipher: &[u8; 32],
    mask: &[u8; 32],
) -> Vec<u8> {
    let mut s = b"fedslm secagg keys v1\0".to_vec();
    for part in [
        run.as_bytes(),
        sum,
        center.as_str().as_bytes(),
        cipher,
        mask,
    ] {
        s.extend_from_slice(&(part.len() as u32).to_le_bytes());
        s.extend_from_slice(part);
    }
    s
}

/// What a centre signs to say who sent a masked input in one sum (the consistency check).
pub fn survivors_statement(run: &str, sum: &[u8; SUM_ID_LEN], survivors: &[CenterId]) -> Vec<u8> {
    let mut s = b"fedslm secagg survivors v1\0".to_vec();
    let mut sorted: Vec<&CenterId> = survivors.iter().collect();
    sorted.sort();
    for part in [run.as_bytes(), sum.as_slice()] {
        s.extend_from_slice(&(part.len() as u32).to_le_bytes());
        s.extend_from_slice(part);
    }
    for c in sorted {
        s.extend_from_slice(&(c.as_str().len() as u32).to_le_bytes());
        s.extend_from_slice(c.as_str().as_bytes());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CenterId {
        CenterId::new(s).unwrap()
    }

    #[test]
    fn both_sides_agree_on_a_pairwise_seed_and_masks_cancel() {
        let (a, b) = (random32().unwrap(), random32().unwrap());
        let sum = [3u8; SUM_ID_LEN];
        let ab = pair_seed(&a, &public_key(&b), &sum).unwrap();
        assert_eq!(ab, pair_seed(&b, &public_key(&a), &sum).unwrap());
        assert_ne!(
            ab,
            pair_seed(&a, &public_key(&b), &[4u8; SUM_ID_LEN]).unwrap()
        );
        let mut v = vec![5u128, 6, 7];
        apply_mask(&ab, &mut v, true);
        assert_ne!(v, vec![5, 6, 7]);
        apply_mask(&ab, &mut v, false);
        assert_eq!(v, vec![5, 6, 7]);
    }

    #[test]
    fn sealed_shares_open_only_for_their_recipient_and_direction() {
        let (a, b) = (random32().unwrap(), random32().unwrap());
        let sum = [1u8; SUM_ID_LEN];
        let (x, y) = ([1u8; SHARE_LEN], [2u8; SHARE_LEN]);
        let sealed = seal(&a, &public_key(&b), &sum, &id("a"), &id("b"), (&x, &y)).unwrap();
        assert_eq!(sealed.len(), SEALED_LEN);
        let opened = open(&b, &public_key(&a), &sum, &id("a"), &id("b"), &sealed).unwrap();
        assert_eq!(opened, (x, y));
        assert!(open(&b, &public_key(&a), &sum, &id("b"), &id("a"), &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(open(&b, &public_key(&a), &sum, &id("a"), &id("b"), &tampered).is_err());
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let a = random32().unwrap();
        assert!(matches!(
            pair_seed(&a, &[0u8; 32], &[0; SUM_ID_LEN]),
            Err(SecureError::WeakKey)
        ));
    }
}
