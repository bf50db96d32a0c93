//! Signatures with the server's TLS key over short statements (the head of the audit log), and their checks: the
//! statement against the certificate, the certificate against the federation CA. ECDSA P-256 with SHA-256, the
//! key type `fedslm certs init` makes.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::CertError;

/// The name of the signature scheme, as the signed files state it.
pub const SIGNATURE_SCHEME: &str = "ecdsa-p256-sha256";

/// The server's key and certificate, to sign with.
pub struct Signer {
    key: EcdsaKeyPair,
    certificate_pem: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The key in `key` (PKCS#8 PEM) and the certificate in `cert` (PEM) whose public key it must match.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Signer, CertError> {
        let certificate_pem = std::fs::read_to_string(cert).map_err(CertError::read(cert))?;
        let der =
            PrivatePkcs8KeyDer::from_pem_file(key).map_err(|e| CertError::malformed(key, e))?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| CertError::malformed(key, format!("not an ECDSA P-256 key: {e}")))?;
        let signer = Signer {
            key: pair,
            certificate_pem,
            rng,
        };
        // A key that does not match its certificate would sign what nobody can check.
        let probe = signer.sign(b"fedslm key check")?;
        verify(&signer.certificate_pem, b"fedslm key check", &probe).map_err(|_| {
            CertError::malformed(key, format!("does not belong to {}", cert.display()))
        })?;
        Ok(signer)
    }

    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CertError> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| CertError::Tls(format!("cannot sign: {e}")))
    }

    /// The signer's certificate (PEM), to travel with what it signs.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }
}

/// Why a signature or a signer's certificate does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("{what}: not a PEM certificate: {reason}")]
    NotPem { what: String, reason: String },
    #[error("{what}: bad certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the signature does not match the certificate's key")]
    Mismatch,
    #[error("the certificate of {subject} was not issued by {ca}")]
    NotIssuedBy { subject: String, ca: String },
    #[error("the certificate of {subject} is not the server's: {why}")]
    NotTheServer { subject: String, why: String },
}

fn parse_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>, SignatureError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| SignatureError::NotPem {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn parse_der<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, SignatureError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| SignatureError::BadCertificate {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

/// Checks `signature` of `message` against the public key of the certificate `certificate_pem`.
pub fn verify(
    certificate_pem: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let der = parse_pem(certificate_pem, "the signer")?;
    let cert = parse_der(&der, "the signer")?;
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        &cert.public_key().subject_public_key.data,
    )
    .verify(message, signature)
    .map_err(|_| SignatureError::Mismatch)
}

/// Checks that `certificate_pem` was signed by the CA certificate in `ca` (PEM), and says whose it is.
pub fn issued_by(certificate_pem: &str, ca: &Path) -> Result<String, SignatureError> {
    let ca_name = ca.display().to_string();
    let ca_pem = std::fs::read_to_string(ca).map_err(|e| SignatureError::Read {
        path: ca_name.clone(),
        reason: e.to_string(),
    })?;
    issued_by_pem(certificate_pem, &ca_pem, &ca_name)
}

/// Checks that `certificate_pem` is a centre's certificate issued by the CA certificate `ca_pem` (named
/// `ca_name` in errors), and says which centre: the identity behind a centre's signed statement.
pub fn center_issued_by(
    certificate_pem: &str,
    ca_pem: &str,
    ca_name: &str,
) -> Result<fedslm_protocol::CenterId, SignatureError> {
    let subject = issued_by_pem(certificate_pem, ca_pem, ca_name)?;
    let der = parse_pem(certificate_pem, "the signer")?;
    crate::identity::center_of(&der).map_err(|e| SignatureError::BadCertificate {
        what: subject,
        reason: e.to_string(),
    })
}

fn issued_by_pem(
    certificate_pem: &str,
    ca_pem: &str,
    ca_name: &str,
) -> Result<String, SignatureError> {
    let ca_name = ca_name.to_string();
    let ca_der = parse_pem(ca_pem, &ca_name)?;
    let ca_cert = parse_der(&ca_der, &ca_name)?;
    let der = parse_pem(certificate_pem, "the signer")?;
    let cert = parse_der(&der, "the signer")?;
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        &ca_cert.public_key().subject_public_key.data,
    )
    .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
    .map_err(|_| SignatureError::NotIssuedBy {
        subject: cert.subject().to_string(),
        ca: ca_name,
    })?;
    Ok(cert.subject().to_string())
}

/// Checks that `certificate_pem` is the federation server's: issued by the CA in `ca`, for server
/// authentication, not a centre's (no centre URI), valid at `at_unix` (when it signed), and, with
/// `server_name`, naming it (as a DNS name or an IP address). Says whose it is.
pub fn server_signer(
    certificate_pem: &str,
    ca: &Path,
    server_name: Option<&str>,
    at_unix: i64,
) -> Result<String, SignatureError> {
    let subject = issued_by(certificate_pem, ca)?;
    let der = parse_pem(certificate_pem, "the signer")?;
    let cert = parse_der(&der, "the signer")?;
    let not = |why: String| SignatureError::NotTheServer {
        subject: subject.clone(),
        why,
    };
    let server_auth = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|eku| eku.value.server_auth);
    if !server_auth {
        return Err(not("it is not for server authentication".into()));
    }
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::URI(uri)
                    if uri.starts_with(crate::CENTER_URI_PREFIX) =>
                {
                    return Err(not(format!("it is a centre's ({uri})")));
                }
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => ips.push(b.to_vec()),
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    if at_unix < validity.not_before.timestamp() || at_unix > validity.not_after.timestamp() {
        return Err(not(format!(
            "it was not valid when it signed (at {at_unix}; valid {} to {})",
            validity.not_before, validity.not_after
        )));
    }
    if let Some(name) = server_name {
        let named = match name.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => ips.iter().any(|b| b[..] == v4.octets()),
            Ok(std::net::IpAddr::V6(v6)) => ips.iter().any(|b| b[..] == v6.octets()),
            Err(_) => dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
        };
        if !named {
            return Err(not(format!("it does not name the server {name}")));
        }
    }
    Ok(subject)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pki, ServerTlsFiles};

    #[test]
    fn a_signature_checks_against_its_certificate_and_the_certificate_against_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(&dir.path().join("pki"), "t", "localhost", &[]).unwrap();
        let files = ServerTlsFiles::in_pki(&dir.path().join("pki"));
        let signer = Signer::from_files(&files.cert, &files.key).unwrap();
        let sig = signer.sign(b"head 7 abc").unwrap();
        verify(signer.certificate_pem(), b"head 7 abc", &sig).unwrap();
        assert!(verify(signer.certificate_pem(), b"head 7 abd", &sig).is_err());
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(verify(signer.certificate_pem(), b"head 7 abc", &bad).is_err());
        issued_by(signer.certificate_pem(), &files.ca).unwrap();

        // Another federation's CA did not issue it, and its server key does not fit this certificate.
        Pki::init(&dir.path().join("other"), "o", "localhost", &[]).unwrap();
        let other = ServerTlsFiles::in_pki(&dir.path().join("other"));
        let err = issued_by(signer.certificate_pem(), &other.ca).unwrap_err();
        assert!(matches!(err, SignatureError::NotIssuedBy { .. }), "{err}");
        assert!(err.to_string().contains("was not issued by"), "{err}");
        let err = Signer::from_files(&files.cert, &other.key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not belong to"), "{err}");
    }

    #[test]
    fn only_the_servers_certificate_may_sign_the_audit_head() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), "t", "localhost", &[]).unwrap();
        let files = ServerTlsFiles::in_pki(&dir.path().join("pki"));
        let server = std::fs::read_to_string(&files.cert).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        server_signer(&server, &files.ca, Some("localhost"), now).unwrap();
        server_signer(&server, &files.ca, None, now).unwrap();
        // Another name, or a time outside its validity (an expired certificate), is not the server's.
        let err = server_signer(&server, &files.ca, Some("example.org"), now).unwrap_err();
        assert!(
            err.to_string()
                .contains("does not name the server example.org"),
            "{err}"
        );
        let err = server_signer(&server, &files.ca, None, now + 20 * 365 * 86400).unwrap_err();
        assert!(
            err.to_string().contains("not valid when it signed"),
            "{err}"
        );
        // A hospital's certificate, issued by the same CA, is not the server's.
        let center = fedslm_protocol::CenterId::new("center-a").unwrap();
        pki.issue(
            &center,
            &dir.path().join("a"),
            crate::IssueOptions::days(30).unwrap(),
        )
        .unwrap();
        let client = std::fs::read_to_string(dir.path().join("a").join("center-a.pem")).unwrap();
        issued_by(&client, &files.ca).unwrap();
        let err = server_signer(&client, &files.ca, None, now).unwrap_err();
        assert!(matches!(err, SignatureError::NotTheServer { .. }), "{err}");
    }
}
