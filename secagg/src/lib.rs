//! Secure aggregation after Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
//! Learning" (CCS 2017), with its consistency check: the server learns the sum of the centres' vectors and
//! nothing else, even when up to `n - t` centres drop out, and even if it lies about who dropped.
//!
//! - [`Participant`] is a centre's side, [`Collector`] the server's: pure state machines, fed the messages of
//!   [`fedslm_protocol::secure`] in order, no sockets and no clock (the round machine times the steps).
//! - Each centre makes two X25519 key pairs per sum (`cipher` to seal its shares, `mask` to agree pairwise
//!   masks), signs the public keys with its certificate key, and checks every other centre's signature
//!   against the federation's CA and the centre the certificate names ([`Federation`]): the server relays keys
//!   but cannot swap in its own.
//! - A centre's input is encoded in fixed point ([`fixed`]), plus a self-mask from a fresh seed, plus for each
//!   other centre a pairwise mask from their agreed secret (added by the lower id, subtracted by the higher),
//!   each a ChaCha20 keystream ([`crypto`]). The seed and the mask key are Shamir-shared ([`shamir`]) among
//!   the participants, threshold `t`.
//! - To unmask, each centre reveals self-mask shares only of centres that sent a masked input and mask-key
//!   shares only of those that did not, after checking that at least `t` participants signed the same list
//!   of survivors; it answers once. So the server never holds both secrets of one centre.
//!
//! *Invariant*: nothing here reads a clock, opens a socket or touches a file but the CA's certificate.

pub mod collector;
pub mod crypto;
pub mod fixed;
pub mod layout;
pub mod participant;
pub mod shamir;

use std::path::Path;

use fedslm_protocol::CenterId;

pub use collector::Collector;
pub use participant::Participant;

/// Why a step of secure aggregation cannot be taken. The text names the centre, the step or the element.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecureError {
    #[error(
        "element {index} is {value}, outside the clipping range of ±{bound:e} (or not finite)"
    )]
    OutOfRange {
        index: usize,
        value: f64,
        bound: f64,
    },
    #[error("the update moves the model by {norm:.4e} (L2), beyond the bound of {bound:.4e}")]
    NormBound { norm: f64, bound: f64 },
    #[error("an input of {got} elements; the sum has {expected}")]
    Length { got: usize, expected: u64 },
    #[error("the sum cannot be set up: {0}")]
    Setup(String),
    #[error("the keys of {center} are refused: {reason}")]
    Forged { center: String, reason: String },
    #[error("expected {expected}, got {got}")]
    Step {
        expected: &'static str,
        got: &'static str,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{stage}: {have} participants left, fewer than the threshold of {threshold}")]
    TooFew {
        stage: &'static str,
        have: usize,
        threshold: usize,
    },
    #[error("the shares cannot be combined: {0}")]
    BadShares(String),
    #[error("the operating system's random generator failed")]
    Random,
    #[error("a public key of low order: no shared secret")]
    WeakKey,
    #[error("cannot seal shares")]
    Seal,
    #[error("the shares from {from} do not open: not sealed for this centre in this sum")]
    Unsealed { from: String },
}

/// Signs statements with a centre's certificate key.
pub trait Signs {
    /// The certificate (PEM) whose key signs.
    fn certificate_pem(&self) -> &str;
    fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, SecureError>;
}

impl Signs for fedslm_certs::Signer {
    fn certificate_pem(&self) -> &str {
        fedslm_certs::Signer::certificate_pem(self)
    }

    fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, SecureError> {
        fedslm_certs::Signer::sign(self, statement).map_err(|e| SecureError::Refused(e.to_string()))
    }
}

/// The federation's CA: whose certificate is whose, and whose signature is whose.
#[derive(Debug, Clone)]
pub struct Federation {
    ca_pem: String,
    ca_name: String,
}

impl Federation {
    /// The CA certificate in `path` (PEM).
    pub fn from_file(path: &Path) -> Result<Federation, SecureError> {
        let ca_pem = std::fs::read_to_string(path).map_err(|e| {
            SecureError::Setup(format!(
                "cannot read the CA certificate {}: {e}",
                path.display()
            ))
        })?;
        Ok(Federation {
            ca_pem,
            ca_name: path.display().to_string(),
        })
    }

    /// Checks that `certificate` (PEM) was issued by the CA to `center`, and that `signature` of `statement`
    /// is its key's.
    pub fn check(
        &self,
        center: &CenterId,
        certificate: &str,
        statement: &[u8],
        signature: &[u8],
    ) -> Result<(), SecureError> {
        let forged = |reason: String| SecureError::Forged {
            center: fedslm_protocol::text::escape_peer(center.as_str()),
            reason,
        };
        let named = fedslm_certs::center_issued_by(certificate, &self.ca_pem, &self.ca_name)
            .map_err(|e| forged(e.to_string()))?;
        if &named != center {
            return Err(forged(format!("its certificate is {named}'s")));
        }
        fedslm_certs::verify_signature(certificate, statement, signature)
            .map_err(|e| forged(e.to_string()))
    }
}
