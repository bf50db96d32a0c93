//! `fedslm client --check`'s look at the node's certificate, before anything connects.

use std::path::{Path, PathBuf};

use fedslm_client::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::CertificateError;

/// The node's certificate, as checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateStatus {
    pub path: PathBuf,
    pub center: String,
    /// Whole days until it expires.
    pub days_left: i64,
}

impl CertificateStatus {
    /// Under 30 days left: time to ask for a new one.
    pub fn renew_soon(&self) -> bool {
        self.days_left < 30
    }
}

/// Checks that the certificate of `config` (read from `config_path`) is readable, names the configured
/// centre, and is valid now.
pub fn certificate(
    config: &ClientConfig,
    config_path: &Path,
) -> Result<CertificateStatus, CertificateError> {
    let path = config.tls.cert.clone();
    let cert = CertificateDer::from_pem_file(&path).map_err(|e| CertificateError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let certified =
        fedslm_certs::center_of(&cert).map_err(|source| CertificateError::Identity {
            path: path.clone(),
            source,
        })?;
    if certified != config.center {
        return Err(CertificateError::OtherCenter {
            config: config_path.to_path_buf(),
            said: config.center.to_string(),
            path,
            certified: certified.to_string(),
        });
    }
    let (not_before, not_after) =
        fedslm_certs::validity_of(&cert).map_err(|source| CertificateError::Identity {
            path: path.clone(),
            source,
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let day = 86_400;
    if now < not_before {
        return Err(CertificateError::NotYetValid {
            path,
            days: (not_before - now) / day,
        });
    }
    if now > not_after {
        return Err(CertificateError::Expired {
            path,
            days: (now - not_after) / day,
        });
    }
    Ok(CertificateStatus {
        path,
        center: certified.to_string(),
        days_left: (not_after - now) / day,
    })
}
