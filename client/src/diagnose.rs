//! `fedslm client --check`: which part of the path to the server failed, and the one-line fix. [`explain`]
//! reads the error a connection attempt ended with (pure); [`probe`] tries each path (QUIC over UDP, TLS over
//! TCP, directly or through the proxy) and explains each.

use std::time::Duration;

use fedslm_transport::{ProxyError, Transport};

use crate::{ClientConfig, ClientError};

/// The step of the path that failed, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `DNS`, `UDP`, `TCP`, `proxy`, `TLS`, `certificate`, `admission` or `connection`.
    pub step: &'static str,
    pub fix: String,
}

/// What `error` (from connecting over `transport` to `server`, whose certificate must name `server_name`)
/// says about the path.
pub fn explain(
    error: &ClientError,
    transport: Transport,
    server: &str,
    server_name: &str,
) -> Finding {
    let port = server.rsplit(':').next().unwrap_or("?");
    let finding = |step, fix: String| Finding { step, fix };
    match error {
        ClientError::Resolve { .. } => finding(
            "DNS",
            "check `server` in client.toml (host:port) and this machine's DNS resolver".into(),
        ),
        ClientError::Timeout { .. } | ClientError::Connect { .. } if transport == Transport::Quic => {
            finding(
                "UDP",
                format!(
                    "no QUIC answer from {server}: outbound UDP or the server's UDP port {port} is blocked; \
                     ask for UDP {port} to the server to be opened, or let the node use TCP (transport = \
                     \"auto\" or \"tcp\")"
                ),
            )
        }
        ClientError::Timeout { .. } | ClientError::Connect { .. } => finding(
            "TCP",
            format!(
                "no TCP connection to {server}: outbound TCP port {port} is blocked or the server does not \
                 listen on it (tcp_listen); ask for TCP {port} to the server to be opened, or set `proxy` to \
                 the hospital's HTTP proxy"
            ),
        ),
        ClientError::Proxy(p) => match p {
            // 407 by the standard; some proxies (tinyproxy) answer 401.
            ProxyError::Refused {
                status: 401 | 407,
                status_line,
                ..
            } => finding(
                "proxy",
                format!(
                    "the proxy asks for credentials ({status_line}): set proxy_credentials to a file \
                     holding `user:password` the proxy accepts"
                ),
            ),
            ProxyError::Refused {
                status_line,
                target,
                ..
            } => finding(
                "proxy",
                format!(
                    "the proxy refused the tunnel ({status_line}): ask for HTTP CONNECT to {target} to be \
                     allowed"
                ),
            ),
            ProxyError::Connect { proxy, .. } | ProxyError::Timeout { proxy } => finding(
                "proxy",
                format!(
                    "the proxy {proxy} cannot be reached: check `proxy` in client.toml (or HTTPS_PROXY)"
                ),
            ),
            other => finding("proxy", other.to_string()),
        },
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

/// One path tried by [`probe`]: what was tried, and its finding if it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathCheck {
    pub path: String,
    pub failed: Option<Finding>,
}

/// Tries each path to the server with the node's certificate, up to the end of TLS (no Hello): QUIC over
/// UDP (within `quic_within`), then TLS over TCP, through the proxy if the route has one.
pub async fn probe(config: &ClientConfig, quic_within: Duration) -> Vec<PathCheck> {
    let mut checks = Vec::new();
    let tls = match crate::client_config(&config.tls) {
        Ok(tls) => tls,
        Err(e) => {
            checks.push(PathCheck {
                path: "certificate files".into(),
                failed: Some(Finding {
                    step: "certificate",
                    fix: e.to_string(),
                }),
            });
            return checks;
        }
    };
    let quic = crate::open_quic(config, tls.clone(), quic_within).await;
    checks.push(
        check(
            format!("QUIC (UDP) to {}", config.server),
            quic,
            Transport::Quic,
            &config.server,
            &config.server_name,
        )
        .await,
    );
    let route = &config.route;
    let path = match &route.proxy {
        Some(p) => format!(
            "TLS over TCP to {} through the proxy {}",
            route.tcp_server, p.address
        ),
        None => format!("TLS over TCP to {}", route.tcp_server),
    };
    let tcp = crate::open_tcp(config, tls).await;
    checks.push(
        check(
            path,
            tcp,
            Transport::Tcp,
            &route.tcp_server,
            &config.server_name,
        )
        .await,
    );
    checks
}

async fn check(
    path: String,
    outcome: Result<fedslm_transport::Link, ClientError>,
    transport: Transport,
    server: &str,
    server_name: &str,
) -> PathCheck {
    match outcome {
        Ok(link) => {
            link.close_and_wait(
                fedslm_protocol::close::DONE,
                b"path checked",
                Duration::from_secs(1),
            )
            .await;
            PathCheck { path, failed: None }
        }
        Err(e) => PathCheck {
            path,
            failed: Some(explain(&e, transport, server, server_name)),
        },
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
        assert_eq!(
            explain(&resolve, Transport::Quic, "nowhere:7878", "nowhere").step,
            "DNS"
        );
        let timeout = ClientError::Timeout {
            server: "s:7878".into(),
            after: std::time::Duration::from_secs(5),
        };
        let f = explain(&timeout, Transport::Quic, "s:7878", "s");
        assert_eq!(f.step, "UDP");
        assert!(f.fix.contains("UDP 7878"), "{}", f.fix);
        let f = explain(&timeout, Transport::Tcp, "s:443", "s");
        assert_eq!(f.step, "TCP");
        assert!(f.fix.contains("TCP 443"), "{}", f.fix);
        let refused = ClientError::Proxy(ProxyError::Refused {
            proxy: "p:3128".into(),
            target: "s:443".into(),
            status: 403,
            status_line: "HTTP/1.1 403 Forbidden".into(),
        });
        let f = explain(&refused, Transport::Tcp, "s:443", "s");
        assert_eq!(f.step, "proxy");
        assert!(
            f.fix.contains("403 Forbidden") && f.fix.contains("CONNECT to s:443"),
            "{}",
            f.fix
        );
        let f = explain(
            &tls("invalid peer certificate: UnknownIssuer"),
            Transport::Tcp,
            "s:7878",
            "s",
        );
        assert_eq!(f.step, "TLS");
        assert!(f.fix.contains("TLS-inspecting proxy"), "{}", f.fix);
        let f = explain(
            &tls("invalid peer certificate: NotValidForName"),
            Transport::Quic,
            "s:7878",
            "fl.example",
        );
        assert!(f.fix.contains("does not name fl.example"), "{}", f.fix);
        // The server's alert about this node's certificate is not the path's fault.
        assert_eq!(
            explain(&tls("peer sent alert"), Transport::Quic, "s:7878", "s").step,
            "certificate"
        );
    }
}
