use std::path::PathBuf;

use fedslm_protocol::{CenterId, CenterIdError};

/// What went wrong with the federation's certificates. Every variant names the file, centre or serial at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("PKI folder {path} does not exist; create it with `fedslm certs init --out {path}`")]
    PkiMissing { path: PathBuf },
    #[error("{path} is not a federation PKI folder: {missing} is missing")]
    NotAPki {
        path: PathBuf,
        missing: &'static str,
    },
    #[error("{path} already exists; refusing to overwrite a federation's keys")]
    AlreadyExists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} is not a valid certificate signing request: {reason}")]
    BadCsr { path: PathBuf, reason: String },
    #[error("no certificate was issued to centre {center}; issued centres: {known}")]
    UnknownCenter { center: CenterId, known: String },
    #[error("no certificate with serial {serial} was issued by this federation")]
    UnknownSerial { serial: String },
    #[error("serial {serial:?} is not hexadecimal")]
    BadSerial { serial: String },
    #[error("certificate {serial} of centre {center} is already revoked")]
    AlreadyRevoked { serial: String, center: String },
    #[error("--days must be between 1 and {max}, not {days}")]
    BadValidity { days: u32, max: u32 },
    #[error(transparent)]
    CenterId(#[from] CenterIdError),
    #[error("peer certificate carries no centre identity (a URI SAN urn:fedslm:center:<id>)")]
    NoCenterIdentity,
    #[error("peer certificate carries {count} centre identities; exactly one is allowed")]
    SeveralCenterIdentities { count: usize },
    #[error("peer certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl CertError {
    pub(crate) fn read(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CertError {
        let path = path.into();
        move |source| CertError::Read { path, source }
    }

    pub(crate) fn write(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CertError {
        let path = path.into();
        move |source| CertError::Write { path, source }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, reason: impl ToString) -> CertError {
        CertError::Malformed {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
