//! An HTTP proxy's tunnel (HTTP CONNECT, RFC 9110 §9.3.6), with optional basic authentication, for the TCP
//! transport. The TLS inside the tunnel is end to end: the proxy sees only the server's name and port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of a proxy's answer head read before giving up on it.
const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// How long a proxy may take to answer CONNECT.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// An HTTP proxy: `http://host:port`, and the credentials of its basic authentication, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub address: String,
    /// `user:password`, read from a file.
    credentials: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("authenticated", &self.credentials.is_some())
            .finish()
    }
}

/// Why a proxy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read the proxy's credentials {}: {source}", path.display())]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the proxy's credentials file {} must hold one line `user:password`", path.display())]
    CredentialsFormat { path: PathBuf },
    #[error("cannot connect to the proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        source: std::io::Error,
    },
    #[error("the proxy {proxy} refused the tunnel to {target}: {status_line}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        /// The proxy's status line, escaped.
        status_line: String,
    },
    #[error("the proxy {proxy} answered CONNECT with something other than HTTP: {reason}")]
    Malformed { proxy: String, reason: String },
    #[error("the proxy {proxy} did not answer CONNECT within {} s", ANSWER_WITHIN.as_secs())]
    Timeout { proxy: String },
}

impl Proxy {
    /// A proxy from its URL (`http://host:port`; `http://` may be left out) and an optional credentials file.
    pub fn parse(url: &str, credentials: Option<&Path>) -> Result<Proxy, ProxyError> {
        let bad = |reason: &str| ProxyError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "only http:// proxies are supported (the tunnel carries TLS itself), not {scheme}://"
                )))
            }
            None => url,
        };
        let address = rest.trim_end_matches('/');
        if address.contains('@') {
            return Err(bad(
                "credentials do not belong in the URL; give them in a file (proxy_credentials)",
            ));
        }
        if address.is_empty() || address.contains('/') {
            return Err(bad("expected http://host:port"));
        }
        let address = match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                address.to_string()
            }
            _ => format!("{address}:3128"),
        };
        let credentials = credentials.map(read_credentials).transpose()?;
        Ok(Proxy {
            address,
            credentials,
        })
    }

    /// The proxy the environment names for a connection to `host` (`HTTPS_PROXY`, then `https_proxy`), unless
    /// `NO_PROXY`/`no_proxy` exempts the host or the host is a loopback address.
    pub fn from_env(host: &str) -> Option<Result<Proxy, ProxyError>> {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let url = var(["HTTPS_PROXY", "https_proxy"])?;
        let exempt = var(["NO_PROXY", "no_proxy"]).unwrap_or_default();
        if is_loopback(host) || exempted(&exempt, host) {
            return None;
        }
        Some(Proxy::parse_env(url.trim()))
    }

    /// A proxy URL from the environment, where `user:password@` in the URL is the usual way to give
    /// credentials (client.toml takes them from a file instead).
    fn parse_env(url: &str) -> Result<Proxy, ProxyError> {
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        let Some((userinfo, address)) = rest.rsplit_once('@') else {
            return Proxy::parse(url, None);
        };
        if !userinfo.contains(':') {
            return Err(ProxyError::Url {
                url: "HTTPS_PROXY".into(),
                reason: "credentials in the URL must be user:password".into(),
            });
        }
        let bare = match scheme {
            Some(scheme) => format!("{scheme}://{address}"),
            None => address.to_string(),
        };
        let mut proxy = Proxy::parse(&bare, None)?;
        proxy.credentials = Some(userinfo.to_string());
        Ok(proxy)
    }

    /// A TCP connection to `target` (`host:port`) through the proxy.
    pub async fn tunnel(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let mut stream =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| ProxyError::Connect {
                    proxy: self.address.clone(),
                    source,
                })?;
        let request = self.connect_request(target);
        let answer = async {
            stream.write_all(request.as_bytes()).await?;
            read_head(&mut stream).await
        };
        let head = tokio::time::timeout(ANSWER_WITHIN, answer)
            .await
            .map_err(|_| ProxyError::Timeout {
                proxy: self.address.clone(),
            })?
            .map_err(|source| ProxyError::Connect {
                proxy: self.address.clone(),
                source,
            })?;
        let status_line = head.lines().next().unwrap_or_default().to_string();
        let status = parse_status(&status_line).ok_or_else(|| ProxyError::Malformed {
            proxy: self.address.clone(),
            reason: escape(&status_line),
        })?;
        if !(200..300).contains(&status) {
            return Err(ProxyError::Refused {
                proxy: self.address.clone(),
                target: target.to_string(),
                status,
                status_line: escape(&status_line),
            });
        }
        Ok(stream)
    }

    fn connect_request(&self, target: &str) -> String {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(c.as_bytes());
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        request
    }
}

fn read_credentials(path: &Path) -> Result<String, ProxyError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Credentials {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.trim();
    if line.lines().count() != 1 || !line.contains(':') {
        return Err(ProxyError::CredentialsFormat {
            path: path.to_path_buf(),
        });
    }
    Ok(line.to_string())
}

/// The answer's head, up to and including the blank line, read byte by byte so that nothing of the tunnel
/// after it is taken; at most [`MAX_ANSWER_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no end of the answer's head within {MAX_ANSWER_HEAD} bytes"),
            ));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection before answering",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts
        .next()?
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
}

/// A peer's text made safe for a log line (control characters escaped, at most 200 characters).
fn escape(s: &str) -> String {
    s.chars().take(200).flat_map(char::escape_default).collect()
}

fn host_of(target: &str) -> &str {
    let host = match target.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => target,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn is_loopback(host: &str) -> bool {
    let host = host_of(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `NO_PROXY`'s list (`*`, hosts, `.domain` or `domain` suffixes) exempts `host`.
fn exempted(list: &str, host: &str) -> bool {
    let host = host_of(host).to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.to_ascii_lowercase();
        let entry = entry.trim_start_matches("*.").trim_start_matches('.');
        !entry.is_empty() && (entry == "*" || host == entry || host.ends_with(&format!(".{entry}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_credentials_in_urls_refused() {
        let p = Proxy::parse("http://proxy.hospital.local:3128", None).unwrap();
        assert_eq!(p.address, "proxy.hospital.local:3128");
        assert_eq!(
            Proxy::parse("proxy:8080/", None).unwrap().address,
            "proxy:8080"
        );
        assert_eq!(
            Proxy::parse("http://proxy", None).unwrap().address,
            "proxy:3128"
        );
        for bad in [
            "https://proxy:3128",
            "socks5://p:1080",
            "http://u:p@proxy:3128",
            "http://p:1/x",
        ] {
            assert!(Proxy::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn basic_credentials_come_from_a_file_and_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("fedslm-proxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("credentials");
        std::fs::write(&file, "node7:s3cret\n").unwrap();
        let p = Proxy::parse("http://proxy:3128", Some(&file)).unwrap();
        let request = p.connect_request("fl.example.org:4433");
        // base64("node7:s3cret")
        assert!(
            request.contains("Proxy-Authorization: Basic bm9kZTc6czNjcmV0\r\n"),
            "{request}"
        );
        assert!(request
            .starts_with("CONNECT fl.example.org:4433 HTTP/1.1\r\nHost: fl.example.org:4433\r\n"));
        assert!(!format!("{p:?}").contains("s3cret"));
        std::fs::write(&file, "no colon\n").unwrap();
        assert!(matches!(
            Proxy::parse("http://proxy:3128", Some(&file)),
            Err(ProxyError::CredentialsFormat { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_environment_may_carry_credentials_in_the_url() {
        let p = Proxy::parse_env("http://node7:s3cret@proxy:3128").unwrap();
        assert_eq!(p.address, "proxy:3128");
        assert!(p
            .connect_request("s:443")
            .contains("Proxy-Authorization: Basic bm9kZTc6czNjcmV0\r\n"));
        assert_eq!(
            Proxy::parse_env("proxy:8080").unwrap().address,
            "proxy:8080"
        );
        assert!(Proxy::parse_env("http://justuser@proxy:3128").is_err());
        // Never in a log line.
        assert!(!format!("{:?}", Proxy::parse_env("http://a:b@p:1").unwrap()).contains("a:b"));
    }

    #[test]
    fn status_lines_and_exemptions() {
        assert_eq!(
            parse_status("HTTP/1.1 200 Connection established"),
            Some(200)
        );
        assert_eq!(
            parse_status("HTTP/1.0 407 Proxy Authentication Required"),
            Some(407)
        );
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status("HTTP/1.1 999 x"), None);
        assert!(exempted(
            "localhost,.hospital.local",
            "fl.hospital.local:4433"
        ));
        assert!(exempted("hospital.local", "fl.hospital.local:4433"));
        assert!(!exempted("hospital.local", "fl.example.org:4433"));
        assert!(exempted("*", "anything:1"));
        assert!(is_loopback("127.0.0.1:4433") && is_loopback("[::1]:4433"));
        assert!(!is_loopback("10.0.0.1:4433"));
        assert_eq!(
            escape("HTTP/1.1 403 \x1b[31mno\n"),
            "HTTP/1.1 403 \\u{1b}[31mno\\n"
        );
    }
}
