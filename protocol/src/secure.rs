//! Secure aggregation's messages (Bonawitz et al., CCS 2017): with a run's `secure_aggregation` on, a task's
//! stream carries a conversation instead of one answer, and the server learns only the sum of what the centres
//! send. The steps, the byte layout and the limits are in PROTOCOL.md; the cryptography is the `secagg` crate's.
//!
//! ```text
//! server → centre   Begin        the sum's id, its participants, threshold, length, scale, bounds
//! server → centre   (the task)   FitTask, EvaluateTask or PlacementTask, as without secure aggregation
//! centre → server   Keys         two X25519 public keys, signed with the centre's certificate key
//! server → centre   Roster       every participant's signed keys (U1)
//! centre → server   Shares       Shamir shares of its two secrets, sealed for each participant
//! server → centre   Delivered    the shares sealed for it, one from each participant that sent (U2)
//! centre → server   Masked       its input in fixed point plus its masks (mod 2^128)
//! server → centre   Survivors    who sent a masked input (U3)
//! centre → server   Consistency  its signature over the survivors
//! server → centre   Unmask       the signatures of at least t participants over the same survivors
//! centre → server   Reveal       a self-mask share for each survivor, a mask-key share for each dropout
//! ```

use crate::center::CenterId;

/// Bytes of a sum's id (random, chosen by the server; bound into every signature and key derivation).
pub const SUM_ID_LEN: usize = 16;
/// Bytes of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of one Shamir share of a 32-byte secret: its x coordinate and 32 bytes of y.
pub const SHARE_LEN: usize = 33;
/// Bytes of a sealed pair of shares: both shares under ChaCha20-Poly1305 (16-byte tag).
pub const SEALED_LEN: usize = 2 * SHARE_LEN + 16;
/// The longest signature accepted (an ASN.1 ECDSA P-256 signature is at most 72 bytes).
pub const MAX_SIGNATURE_LEN: usize = 128;
/// The longest certificate (PEM) accepted with a centre's keys.
pub const MAX_CERTIFICATE_LEN: usize = 16 * 1024;
/// The most participants of one sum (Shamir's x coordinates are the non-zero bytes).
pub const MAX_PARTICIPANTS: usize = 255;
/// The fewest participants a secure sum may have: with two, each learns the other's term by subtracting its
/// own from the total.
pub const MIN_PARTICIPANTS: usize = 3;

/// Server → centre, before the task: a secure sum begins.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct SecureBegin {
    pub sum: [u8; SUM_ID_LEN],
    /// Every centre asked, in order; the centre's own id among them.
    pub participants: Vec<CenterId>,
    /// Shares needed to rebuild a secret, more than half the participants (the consistency check's premise).
    pub threshold: u32,
    /// Elements of the input vector.
    pub length: u64,
    /// Fixed point: each element is `round(x * 2^scale_bits)` in the ring of 2^64.
    pub scale_bits: u8,
    /// Each element's magnitude must be at most this before it is encoded (the clipping range).
    pub bound: f64,
    /// A fit's update may move the global model by at most this (L2, batch-norm statistics excluded); the
    /// centre checks it, since the server cannot.
    pub norm_bound: Option<f64>,
}

/// A participant's public keys for one sum: `cipher` seals its shares, `mask` agrees the pairwise masks.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct SignedKeys {
    pub center: CenterId,
    /// The centre's certificate (PEM), issued by the federation's CA: the signature's key.
    pub certificate: String,
    pub cipher: [u8; PUBLIC_KEY_LEN],
    pub mask: [u8; PUBLIC_KEY_LEN],
    /// ECDSA P-256 over the run, the sum, the centre and both keys (the `secagg` crate's statement).
    pub signature: Vec<u8>,
}

/// Shares sealed by `from` for `to`.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct SealedShare {
    pub from: CenterId,
    pub to: CenterId,
    pub sealed: Vec<u8>,
}

/// A centre's masked input: elements of the ring of 2^128.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedInput {
    pub values: MaskedValues,
    /// An evaluation's one per-centre figure, released in the clear where the centre's policy lets it
    /// (`privacy.release_own_auc`): its own AUC of the task's patients. `None` for other sums.
    pub own_auc: Option<f64>,
}

/// The elements of a masked input as 16-byte little-endian words: made by a centre, or, where the server read
/// them, a view into the frame they came in (a masked model is not copied on arrival).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedValues(bytes::Bytes);

impl MaskedValues {
    pub fn from_words(words: &[u128]) -> MaskedValues {
        let mut out = Vec::with_capacity(16 * words.len());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        MaskedValues(out.into())
    }

    /// `bytes`, a whole number of 16-byte words.
    pub(crate) fn from_bytes(bytes: bytes::Bytes) -> MaskedValues {
        MaskedValues(bytes)
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.0.len() / 16
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The elements in order.
    pub fn words(&self) -> impl Iterator<Item = u128> + '_ {
        self.0.chunks_exact(16).map(|c| {
            let mut w = [0u8; 16];
            w.copy_from_slice(c);
            u128::from_le_bytes(w)
        })
    }

    /// The encoded words.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Which of a participant's secrets a share rebuilds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, bincode::Encode, bincode::Decode,
)]
pub enum SecretKind {
    /// The seed of its self-mask: revealed only for a survivor.
    SelfMask,
    /// Its X25519 mask key: revealed only for a participant that dropped before its masked input.
    MaskKey,
}

/// One share revealed for unmasking.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct RevealedShare {
    pub owner: CenterId,
    pub kind: SecretKind,
    pub share: [u8; SHARE_LEN],
}

/// A signature over the survivors by one participant.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct SurvivorSignature {
    pub center: CenterId,
    pub signature: Vec<u8>,
}

/// One message of the conversation (frame kind 13).
#[derive(Debug, Clone, PartialEq)]
pub enum Secure {
    Begin(SecureBegin),
    Keys(SignedKeys),
    Roster(Vec<SignedKeys>),
    Shares(Vec<SealedShare>),
    Delivered(Vec<SealedShare>),
    Masked(MaskedInput),
    Survivors(Vec<CenterId>),
    Consistency(Vec<u8>),
    Unmask(Vec<SurvivorSignature>),
    Reveal(Vec<RevealedShare>),
}

impl Secure {
    /// The step's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Secure::Begin(_) => "Begin",
            Secure::Keys(_) => "Keys",
            Secure::Roster(_) => "Roster",
            Secure::Shares(_) => "Shares",
            Secure::Delivered(_) => "Delivered",
            Secure::Masked(_) => "Masked",
            Secure::Survivors(_) => "Survivors",
            Secure::Consistency(_) => "Consistency",
            Secure::Unmask(_) => "Unmask",
            Secure::Reveal(_) => "Reveal",
        }
    }

    /// The step's tag byte on the wire.
    pub(crate) fn tag(&self) -> u8 {
        match self {
            Secure::Begin(_) => 0,
            Secure::Keys(_) => 1,
            Secure::Roster(_) => 2,
            Secure::Shares(_) => 3,
            Secure::Delivered(_) => 4,
            Secure::Masked(_) => 5,
            Secure::Survivors(_) => 6,
            Secure::Consistency(_) => 7,
            Secure::Unmask(_) => 8,
            Secure::Reveal(_) => 9,
        }
    }
}
