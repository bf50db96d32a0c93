//! `client.toml`: which centre this node is, where the server is, the node's certificate files, its cohort and
//! how it codes and preprocesses it.

use std::path::{Path, PathBuf};

use fedslm_certs::ClientTlsFiles;
use fedslm_cohort::{ClinicalCoding, PreprocessSettings};
use fedslm_protocol::CenterId;
use serde::Deserialize;

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
    center: String,
    server: String,
    server_name: Option<String>,
    transport: Option<String>,
    quic_fallback_secs: Option<u64>,
    tcp_server: Option<String>,
    proxy: Option<String>,
    proxy_credentials: Option<PathBuf>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cohort: Option<PathBuf>,
    cache: Option<PathBuf>,
    threads: Option<usize>,
    record: Option<PathBuf>,
    scores: Option<PathBuf>,
    #[serde(default)]
    coding: ClinicalCoding,
    #[serde(default)]
    preprocess: PreprocessSettings,
    #[serde(default)]
    privacy: crate::policy::PolicyFile,
    #[serde(default)]
    augmentation: fedslm_cohort::Augmentation,
}

/// Which transport a node uses (`transport` in client.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// QUIC, and TLS over TCP if QUIC does not connect within `quic_fallback` (the default).
    Auto,
    Quic,
    Tcp,
}

/// How long QUIC gets, by default, before a node tries TCP.
pub const QUIC_FALLBACK: std::time::Duration = std::time::Duration::from_secs(5);

/// The path to the server: the transport, where TCP goes, and the proxy it goes through.
#[derive(Debug, Clone)]
pub struct Route {
    pub transport: TransportChoice,
    /// With `Auto`: how long QUIC gets before TCP is tried.
    pub quic_fallback: std::time::Duration,
    /// `host:port` of the server's TCP listener (`tcp_server`; by default `server`).
    pub tcp_server: String,
    /// The HTTP proxy TCP goes through (`proxy`, or `HTTPS_PROXY` from the environment).
    pub proxy: Option<fedslm_transport::Proxy>,
}

impl Route {
    /// `transport` to the server, TCP at `tcp_server`, no proxy.
    pub fn direct(transport: TransportChoice, tcp_server: String) -> Route {
        Route {
            transport,
            quic_fallback: QUIC_FALLBACK,
            tcp_server,
            proxy: None,
        }
    }
}

/// A checked client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The centre this node believes it is; the server trusts only the certificate.
    pub center: CenterId,
    /// `host:port` of the coordinating server.
    pub server: String,
    /// The name the server's certificate must carry.
    pub server_name: String,
    /// How the node reaches the server: QUIC, TLS over TCP (directly or through a proxy), or QUIC first.
    pub route: Route,
    pub tls: ClientTlsFiles,
    /// How clinical factors are coded; hashed into the Hello with `preprocess`.
    pub coding: ClinicalCoding,
    /// How images become network inputs.
    pub preprocess: PreprocessSettings,
    /// The centre's cohort: a folder with `manifest.csv`.
    pub cohort: Option<PathBuf>,
    /// Where preprocessed crops are cached between runs.
    pub cache: Option<PathBuf>,
    /// Threads for loading and training; `None`: every core.
    pub threads: Option<usize>,
    /// A folder where the node keeps a copy of every update it sends (what left the site).
    pub record: Option<PathBuf>,
    /// A folder where the node keeps each run's per-patient evaluation scores (`<run id>.csv`), so that a later
    /// run's paired comparison can use them after this process has ended. They never leave the site.
    pub scores: Option<PathBuf>,
    /// What the site lets out (`[privacy]`).
    pub privacy: crate::policy::Policy,
    /// The site's privacy ledger (`privacy.ledger`): every differentially private release, recorded before it
    /// is sent.
    pub ledger: Option<PathBuf>,
    /// How the node augments its crops in local training (`[augmentation]`; its scanner style is the
    /// `[augmentation.scanner]` table).
    pub augmentation: fedslm_cohort::Augmentation,
}

impl ClientConfig {
    /// Reads `client.toml`; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<ClientConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClientConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClientConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let center = CenterId::new(file.center).map_err(|e| invalid(format!("center: {e}")))?;
        let server_name = match file.server_name {
            Some(n) => n,
            None => host_of(&file.server)
                .ok_or_else(|| invalid(format!("server {:?} is not host:port", file.server)))?,
        };
        if file.threads == Some(0) {
            return Err(invalid("threads must be at least 1".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let transport = match file.transport.as_deref() {
            None | Some("auto") => TransportChoice::Auto,
            Some("quic") => TransportChoice::Quic,
            Some("tcp") => TransportChoice::Tcp,
            Some(other) => {
                return Err(invalid(format!(
                    "transport {other:?}: expected \"auto\", \"quic\" or \"tcp\""
                )))
            }
        };
        let tcp_server = file.tcp_server.unwrap_or_else(|| file.server.clone());
        if host_of(&tcp_server).is_none() {
            return Err(invalid(format!(
                "tcp_server {tcp_server:?} is not host:port"
            )));
        }
        let credentials = file.proxy_credentials.map(|p| base.join(p));
        let proxy = match &file.proxy {
            Some(url) => Some(fedslm_transport::Proxy::parse(url, credentials.as_deref())),
            None if credentials.is_some() => {
                return Err(invalid("proxy_credentials without a proxy".into()))
            }
            None => fedslm_transport::Proxy::from_env(&tcp_server),
        }
        .transpose()
        .map_err(|e| invalid(e.to_string()))?;
        let route = Route {
            transport,
            quic_fallback: std::time::Duration::from_secs(
                file.quic_fallback_secs
                    .unwrap_or(QUIC_FALLBACK.as_secs())
                    .clamp(1, 60),
            ),
            tcp_server,
            proxy,
        };
        Ok(ClientConfig {
            route,
            cohort: file.cohort.map(|p| base.join(p)),
            cache: file.cache.map(|p| base.join(p)),
            threads: file.threads,
            record: file.record.map(|p| base.join(p)),
            scores: file.scores.map(|p| base.join(p)),
            center,
            server: file.server,
            server_name,
            tls: ClientTlsFiles {
                ca: base.join(file.ca),
                cert: base.join(file.cert),
                key: base.join(file.key),
            },
            coding: file.coding,
            preprocess: {
                file.preprocess.check().map_err(invalid)?;
                file.preprocess
            },
            ledger: file.privacy.ledger.as_ref().map(|p| base.join(p)),
            augmentation: {
                if let Some(style) = &file.augmentation.scanner {
                    style
                        .check()
                        .map_err(|e| invalid(format!("augmentation.scanner: {e}")))?;
                }
                file.augmentation
            },
            privacy: file.privacy.try_into().map_err(invalid)?,
        })
    }

    /// The hash of the coding and preprocessing settings that the Hello carries.
    pub fn settings_hash(&self) -> [u8; 32] {
        fedslm_cohort::settings_hash(&self.coding, &self.preprocess)
    }
}

fn host_of(server: &str) -> Option<String> {
    let (host, port) = server.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        center = "center-a"
        server = "127.0.0.1:7878"
        ca = "certs/ca.pem"
        cert = "certs/center-a.pem"
        key = "certs/center-a.key"
    "#;

    fn parse(text: &str) -> Result<ClientConfig, String> {
        ClientConfig::parse(text, Path::new("/srv/node/client.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server_name, "127.0.0.1");
        assert_eq!(c.tls.key, Path::new("/srv/node/certs/center-a.key"));
        let v6 = parse(&GOOD.replace("127.0.0.1:7878", "[::1]:7878")).unwrap();
        assert_eq!(v6.server_name, "::1");
    }

    #[test]
    fn settings_change_the_hash_and_defaults_are_the_study_s() {
        let a = parse(&format!(
            "{GOOD}\n[coding]\ncea_cutoff = 5.0\nca199_cutoff = 37.0"
        ))
        .unwrap();
        let b = parse(GOOD).unwrap();
        let c = parse(&format!(
            "{GOOD}\n[coding]\nca199_cutoff = 37.0\ncea_cutoff = 10.0"
        ))
        .unwrap();
        assert_eq!(a.settings_hash(), b.settings_hash());
        assert_ne!(a.settings_hash(), c.settings_hash());
        let d = parse(&format!("{GOOD}\n[preprocess]\nsize = 96")).unwrap();
        assert_ne!(a.settings_hash(), d.settings_hash());
        let e = parse(&format!("{GOOD}\n[coding]\ncea_cutof = 5.0")).unwrap_err();
        assert!(e.contains("cea_cutof"), "{e}");
    }

    #[test]
    fn an_intensity_scale_is_part_of_the_shared_settings_and_a_bad_one_is_refused_by_sequence() {
        let plain = parse(GOOD).unwrap();
        let scale = "[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]";
        let with = |dwi: &str| {
            format!(
                "{GOOD}\n[preprocess.intensity_scale]\nt2w = {scale}\ndwi = {dwi}\nadc = {scale}\n"
            )
        };
        let scaled = parse(&with(scale)).unwrap();
        assert!(scaled.preprocess.intensity_scale.is_some());
        assert_ne!(scaled.settings_hash(), plain.settings_hash());
        let e = parse(&with(
            "[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 0.8, 1.0]",
        ))
        .unwrap_err();
        assert!(e.contains("intensity_scale.dwi"), "{e}");
        let e = parse(&with(
            "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]",
        ))
        .unwrap_err();
        assert!(e.contains("from 0 to 1"), "{e}");
        let e = parse(&format!("{GOOD}\n[preprocess]\nsize = 0")).unwrap_err();
        assert!(e.contains("preprocess.size"), "{e}");
    }

    #[test]
    fn augmentation_is_the_site_s_and_bad_ranges_are_refused_by_key() {
        let plain = parse(GOOD).unwrap();
        assert_eq!(plain.augmentation, fedslm_cohort::Augmentation::default());
        assert!(plain.augmentation.scanner.is_none(), "off unless asked for");
        let chosen = parse(&format!("{GOOD}\n[augmentation.scanner]\n")).unwrap();
        assert_eq!(
            chosen.augmentation.scanner,
            Some(fedslm_cohort::ScannerStyle::CHOSEN)
        );
        // Augmentation acts only on training: the inputs every centre must share are unchanged.
        assert_eq!(chosen.settings_hash(), plain.settings_hash());
        let e = parse(&format!(
            "{GOOD}\n[augmentation.scanner]\nmax_noise = 5.0\n"
        ))
        .unwrap_err();
        assert!(e.contains("augmentation.scanner: max_noise 5"), "{e}");
        let e = parse(&format!("{GOOD}\n[augmentation]\nflip = true\n")).unwrap_err();
        assert!(e.contains("flip"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse(&GOOD.replace("center-a\"", "Center A\"")).unwrap_err();
        assert!(e.contains("client.toml") && e.contains("center:"), "{e}");
        let e = parse(&GOOD.replace("127.0.0.1:7878", "localhost")).unwrap_err();
        assert!(e.contains("not host:port"), "{e}");
        let e = parse(&GOOD.replace("key =", "kee =")).unwrap_err();
        assert!(e.contains("kee"), "{e}");
    }

    #[test]
    fn the_route_defaults_to_quic_then_tcp_on_the_same_address() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.route.transport, TransportChoice::Auto);
        assert_eq!(c.route.quic_fallback, QUIC_FALLBACK);
        assert_eq!(c.route.tcp_server, "127.0.0.1:7878");
        // Loopback never goes through a proxy, whatever the environment says.
        assert!(c.route.proxy.is_none());
        let tcp = parse(&format!(
            "{GOOD}\ntransport = \"tcp\"\ntcp_server = \"fl.example.org:443\"\n\
             proxy = \"http://proxy.hospital.local:3128\"\nquic_fallback_secs = 2"
        ))
        .unwrap();
        assert_eq!(tcp.route.transport, TransportChoice::Tcp);
        assert_eq!(tcp.route.tcp_server, "fl.example.org:443");
        assert_eq!(
            tcp.route.proxy.map(|p| p.address),
            Some("proxy.hospital.local:3128".to_string())
        );
        assert_eq!(tcp.route.quic_fallback, std::time::Duration::from_secs(2));
    }

    #[test]
    fn route_mistakes_are_named() {
        let e = parse(&format!("{GOOD}\ntransport = \"udp\"")).unwrap_err();
        assert!(e.contains("transport \"udp\""), "{e}");
        let e = parse(&format!("{GOOD}\ntcp_server = \"fl.example.org\"")).unwrap_err();
        assert!(e.contains("tcp_server"), "{e}");
        let e = parse(&format!("{GOOD}\nproxy_credentials = \"p.txt\"")).unwrap_err();
        assert!(e.contains("proxy_credentials without a proxy"), "{e}");
        let e = parse(&format!("{GOOD}\nproxy = \"https://proxy:3128\"")).unwrap_err();
        assert!(e.contains("only http:// proxies"), "{e}");
        let e = parse(&format!(
            "{GOOD}\nproxy = \"http://proxy:3128\"\nproxy_credentials = \"missing.txt\""
        ))
        .unwrap_err();
        assert!(e.contains("/srv/node/missing.txt"), "{e}");
    }
}
