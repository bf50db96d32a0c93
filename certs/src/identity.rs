//! A peer's centre id, read from its verified certificate: the only source of identity the server trusts.

use fedslm_protocol::CenterId;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::error::CertError;

/// Prefix of the URI SAN that names a centre: `urn:fedslm:center:<id>`.
pub const CENTER_URI_PREFIX: &str = "urn:fedslm:center:";

/// The centre id in a certificate's URI SAN. Call it only on a chain the TLS layer has verified.
pub fn center_of(cert: &CertificateDer<'_>) -> Result<CenterId, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertError::BadPeerCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| CertError::BadPeerCertificate(e.to_string()))?;
    let ids: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(CENTER_URI_PREFIX),
            _ => None,
        })
        .collect();
    match ids.as_slice() {
        [] => Err(CertError::NoCenterIdentity),
        [one] => Ok(CenterId::new(*one)?),
        many => Err(CertError::SeveralCenterIdentities { count: many.len() }),
    }
}

/// The centre id of a peer from its certificate chain as the TLS layer reports it (leaf first).
pub fn peer_center(chain: &[CertificateDer<'_>]) -> Result<CenterId, CertError> {
    chain
        .first()
        .ok_or(CertError::NoCenterIdentity)
        .and_then(center_of)
}

/// A certificate's serial number in hexadecimal (as the CRL and `fedslm certs list` show it).
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<String, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertError::BadPeerCertificate(e.to_string()))?;
    Ok(fedslm_protocol::hex::to_hex(parsed.raw_serial()))
}

/// A certificate's validity period, as Unix seconds (not before, not after).
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(i64, i64), CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertError::BadPeerCertificate(e.to_string()))?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}
