//! `server.toml`: where to listen, the PKI, the run and its enrolled centres.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedslm_certs::ServerTlsFiles;
use fedslm_protocol::hex::from_hex;
use fedslm_protocol::{CenterId, Role, DEFAULT_CONNECTION_BUDGET};
use serde::Deserialize;

use crate::admission::Enrolment;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: SocketAddr,
    pki: PathBuf,
    run_id: String,
    #[serde(default = "default_rounds")]
    rounds: u32,
    settings_hash: Option<String>,
    #[serde(default = "default_hello_timeout")]
    hello_timeout_secs: u64,
    #[serde(default = "default_budget")]
    connection_budget_bytes: u64,
    #[serde(default)]
    center: Vec<CenterEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CenterEntry {
    id: String,
    role: RoleName,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Train,
    Validate,
}

fn default_rounds() -> u32 {
    20
}
fn default_hello_timeout() -> u64 {
    10
}
fn default_budget() -> u64 {
    DEFAULT_CONNECTION_BUDGET
}

/// A checked server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: ServerTlsFiles,
    pub enrolment: Enrolment,
    /// How long a connected peer has to send its Hello.
    pub hello_timeout: Duration,
    pub connection_budget: u64,
}

impl ServerConfig {
    /// Reads `server.toml`; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ServerConfig::parse(&text, path)
    }

    /// Parses the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ServerConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.center.is_empty() {
            return Err(invalid(
                "no centre is enrolled: add [[center]] entries with an id and a role (train or validate)".into(),
            ));
        }
        let mut centers = BTreeMap::new();
        for c in &file.center {
            let id =
                CenterId::new(c.id.as_str()).map_err(|e| invalid(format!("[[center]] {e}")))?;
            let role = match c.role {
                RoleName::Train => Role::Train,
                RoleName::Validate => Role::Validate,
            };
            if centers.insert(id.clone(), role).is_some() {
                return Err(invalid(format!("centre {id} is enrolled twice")));
            }
        }
        if !centers.values().any(|r| *r == Role::Train) {
            return Err(invalid("no centre has the role train".into()));
        }
        if file.run_id.trim().is_empty() {
            return Err(invalid("run_id is empty".into()));
        }
        let settings_hash = match &file.settings_hash {
            None => None,
            Some(h) => Some(
                from_hex(h)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "settings_hash {h:?} is not 64 hexadecimal digits (a SHA-256)"
                        ))
                    })?,
            ),
        };
        if file.hello_timeout_secs == 0 {
            return Err(invalid("hello_timeout_secs must be at least 1".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(ServerConfig {
            listen: file.listen,
            tls: ServerTlsFiles::in_pki(&base.join(&file.pki)),
            enrolment: Enrolment {
                run_id: file.run_id,
                rounds: file.rounds,
                centers,
                settings_hash,
            },
            hello_timeout: Duration::from_secs(file.hello_timeout_secs),
            connection_budget: file.connection_budget_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        listen = "127.0.0.1:7878"
        pki = "pki"
        run_id = "slm-2026"
        [[center]]
        id = "center-a"
        role = "train"
        [[center]]
        id = "external"
        role = "validate"
    "#;

    fn parse(text: &str) -> Result<ServerConfig, String> {
        ServerConfig::parse(text, Path::new("/etc/fedslm/server.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_minimal_file_gets_defaults_and_paths_relative_to_it() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tls.ca, Path::new("/etc/fedslm/pki/ca.pem"));
        assert_eq!(c.enrolment.rounds, 20);
        assert_eq!(c.enrolment.centers.len(), 2);
        assert_eq!(c.hello_timeout, Duration::from_secs(10));
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse(&GOOD.replace("\"validate\"", "\"observe\"")).unwrap_err();
        assert!(e.contains("server.toml") && e.contains("observe"), "{e}");
        let e = parse(&GOOD.replace("\"external\"", "\"External\"")).unwrap_err();
        assert!(e.contains("\"External\" contains 'E'"), "{e}");
        let e = parse(&GOOD.replace("\"external\"", "\"center-a\"")).unwrap_err();
        assert!(e.contains("centre center-a is enrolled twice"), "{e}");
        let e = parse(&GOOD.replace("run_id", "runid")).unwrap_err();
        assert!(e.contains("runid"), "{e}");
        let e = parse(&format!("settings_hash = \"abc\"\n{GOOD}")).unwrap_err();
        assert!(e.contains("not 64 hexadecimal digits"), "{e}");
        let e = parse(
            r#"listen = "127.0.0.1:1"
            pki = "p"
            run_id = "r""#,
        )
        .unwrap_err();
        assert!(e.contains("no centre is enrolled"), "{e}");
    }
}
