//! QUIC's connection errors, made transport-neutral.

use quinn::ConnectionError;

use crate::Closed;

impl From<ConnectionError> for Closed {
    fn from(e: ConnectionError) -> Closed {
        if let Some(alert) = fedslm_certs::tls_alert(&e) {
            let reason = match &e {
                ConnectionError::ConnectionClosed(c) => String::from_utf8_lossy(&c.reason).into(),
                ConnectionError::TransportError(t) => t.reason.clone(),
                other => other.to_string(),
            };
            return Closed::TlsAlert { alert, reason };
        }
        match e {
            ConnectionError::ApplicationClosed(c) => Closed::Application {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into(),
            },
            ConnectionError::LocallyClosed => Closed::Locally,
            ConnectionError::TimedOut => Closed::TimedOut,
            ConnectionError::Reset => Closed::Reset,
            other => Closed::Lost(other.to_string()),
        }
    }
}
