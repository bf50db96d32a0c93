//! The TLS alert behind a failure over TCP: received from the peer, or the one rustls sends for its own
//! verdict (QUIC carries both as its crypto error codes; `fedslm_certs::tls_alert` reads those).

use rustls::{AlertDescription, Error};

/// The alert a rustls error means: the one received, or the one this side sends for it.
pub fn alert_of_rustls(e: &Error) -> Option<u8> {
    let alert = match e {
        Error::AlertReceived(a) => *a,
        Error::InvalidCertificate(c) => AlertDescription::from(c.clone()),
        Error::NoCertificatesPresented => AlertDescription::CertificateRequired,
        Error::NoApplicationProtocol => AlertDescription::NoApplicationProtocol,
        Error::PeerIncompatible(_) => AlertDescription::HandshakeFailure,
        Error::PeerMisbehaved(_) => AlertDescription::IllegalParameter,
        Error::DecryptError => AlertDescription::DecryptError,
        _ => return None,
    };
    Some(u8::from(alert))
}

/// The alert anywhere in `e`'s chain of causes (yamux wraps the socket's I/O error in its own).
pub fn alert_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<Error>() {
            return alert_of_rustls(tls);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(alert) = alert_of_io(io) {
                return Some(alert);
            }
        }
        cause = c.source();
    }
    None
}

/// The rustls error inside an I/O error (tokio-rustls reports TLS failures as I/O errors), as an alert.
pub fn alert_of_io(e: &std::io::Error) -> Option<u8> {
    let inner = e.get_ref()?;
    if let Some(tls) = inner.downcast_ref::<Error>() {
        return alert_of_rustls(tls);
    }
    // yamux wraps the socket's error once more.
    inner.downcast_ref::<std::io::Error>().and_then(alert_of_io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn certificate_verdicts_map_to_the_alerts_quic_reports() {
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                48,
            ),
            (Error::InvalidCertificate(CertificateError::Expired), 45),
            (Error::InvalidCertificate(CertificateError::Revoked), 44),
            (Error::NoCertificatesPresented, 116),
            (Error::NoApplicationProtocol, 120),
            (
                Error::AlertReceived(AlertDescription::CertificateRevoked),
                44,
            ),
        ];
        for (e, alert) in cases {
            assert_eq!(alert_of_rustls(&e), Some(alert), "{e}");
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            assert_eq!(alert_of_io(&io), Some(alert));
        }
        assert_eq!(alert_of_io(&std::io::Error::other("plain")), None);
    }
}
