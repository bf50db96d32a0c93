//! `fedslm client --check`: which part of the path to the server failed, and the one-line fix, from the
//! error a connection attempt ended with. Pure: no IO.

use crate::ClientError;

/// The step of the path that failed, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `DNS`, `UDP`, `TLS`, `certificate`, `admission` or `connection`.
    pub step: &'static str,
    pub fix: String,
}

/// What `error` (from connecting to `server`, whose certificate must name `server_name`) says about the path.
pub fn explain(error: &ClientError, server: &str, server_name: &str) -> Finding {
    let port = server.rsplit(':').next().unwrap_or("?");
    let finding = |step, fix: String| Finding { step, fix };
    match error {
        ClientError::Resolve { .. } => finding(
            "DNS",
            "check `server` in client.toml (host:port) and this machine's DNS resolver".into(),
        ),
        ClientError::Timeout { .. } | ClientError::Connect { .. } => finding(
            "UDP",
            format!(
                "no QUIC answer from {server}: outbound UDP or the server's UDP port {port} is blocked; ask \
                 for UDP {port} to the server to be opened on every firewall between (TCP being open is not \
                 enough)"
            ),
        ),
        // This node refused the server's certificate (rustls' own words), or the server refused this node's.
        ClientError::TlsAlert { reason, name, .. } if reason.contains("invalid peer certificate") => {
            if reason.contains("NotValidForName") {
                finding(
                    "TLS",
                    format!(
                        "the server's certificate does not name {server_name}: set `server_name` in \
                         client.toml to the name the coordinating centre gave its server"
                    ),
                )
            } else if reason.contains("Expired") || reason.contains("NotValidYet") {
                finding(
                    "TLS",
                    format!("the server's certificate is not valid now ({name}): check this machine's clock"),
                )
            } else {
                finding(
                    "TLS",
                    "the server's certificate is not from the federation CA: a TLS-inspecting proxy is in \
                     the way, or `ca` is not the federation's ca.pem; ask for an exception for this host"
                        .into(),
                )
            }
        }
        ClientError::TlsAlert { name, .. } => finding(
            "certificate",
            format!(
                "the server refused this centre's certificate ({name}): ask the coordinating centre for a \
                 new one (revoked, expired or from another federation)"
            ),
        ),
        ClientError::Refused { message, .. } => finding("admission", message.clone()),
        other => finding("connection", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(reason: &str) -> ClientError {
        ClientError::TlsAlert {
            server: "s:7878".into(),
            alert: 48,
            name: "UnknownCA".into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn each_failure_names_its_step() {
        let resolve = ClientError::Resolve {
            server: "nowhere:7878".into(),
            reason: "no address".into(),
        };
        assert_eq!(explain(&resolve, "nowhere:7878", "nowhere").step, "DNS");
        let timeout = ClientError::Timeout {
            server: "s:7878".into(),
            after: std::time::Duration::from_secs(5),
        };
        let f = explain(&timeout, "s:7878", "s");
        assert_eq!(f.step, "UDP");
        assert!(f.fix.contains("UDP 7878"), "{}", f.fix);
        let f = explain(
            &tls("invalid peer certificate: UnknownIssuer"),
            "s:7878",
            "s",
        );
        assert_eq!(f.step, "TLS");
        assert!(f.fix.contains("TLS-inspecting proxy"), "{}", f.fix);
        let f = explain(
            &tls("invalid peer certificate: NotValidForName"),
            "s:7878",
            "fl.example",
        );
        assert!(f.fix.contains("does not name fl.example"), "{}", f.fix);
        // The server's alert about this node's certificate is not the path's fault.
        assert_eq!(
            explain(&tls("peer sent alert"), "s:7878", "s").step,
            "certificate"
        );
    }
}
