//! rustls configurations for both ends of a fedslm connection: TLS 1.3 only, ring only, ALPN `fedslm/1`,
//! mutual authentication against the federation CA, revocation by the federation's CRL.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::error::CertError;

/// The one crypto provider fedslm uses. quinn and rustls are both built with ring alone; passing it
/// explicitly keeps a second provider from ever being picked up by default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS files.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
}

impl ServerTlsFiles {
    /// The standard files of a PKI folder made by `fedslm certs init`.
    pub fn in_pki(dir: &Path) -> ServerTlsFiles {
        ServerTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            crl: dir.join("crl.pem"),
        }
    }
}

/// A hospital client's TLS files.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if !path.is_file() {
        return Err(CertError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::malformed(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::malformed(path, e))?;
    if certs.is_empty() {
        return Err(CertError::malformed(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    if !path.is_file() {
        return Err(CertError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| CertError::malformed(path, e))
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| CertError::malformed(path, e))?;
    }
    Ok(Arc::new(roots))
}

fn load_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, CertError> {
    let bytes = fs::read(path).map_err(CertError::read(path))?;
    CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| CertError::malformed(path, e))
}

/// Server side: requires a client certificate chained to the federation CA, with the client-auth usage and
/// not on the CRL. TLS 1.3 only; ALPN `fedslm/1`.
pub fn server_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, CertError> {
    Ok(server_config_with_verifier(files)?.0)
}

/// [`server_config`], and its client verifier, for the server to check its live connections against the CRL
/// whenever it changes ([`ReloadingClientVerifier::revoked`]).
pub fn server_config_with_verifier(
    files: &ServerTlsFiles,
) -> Result<(rustls::ServerConfig, Arc<ReloadingClientVerifier>), CertError> {
    let provider = provider();
    let verifier = Arc::new(ReloadingClientVerifier::new(
        load_roots(&files.ca)?,
        files.crl.clone(),
        provider.clone(),
    )?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| CertError::Tls(format!("{}: {e}", files.key.display())))?;
    config.alpn_protocols = vec![fedslm_protocol::ALPN.to_vec()];
    Ok((config, verifier))
}

/// Client side: verifies the server against the federation CA (and the server name at connect time) and
/// presents the centre's certificate. TLS 1.3 only; ALPN `fedslm/1`.
pub fn client_config(files: &ClientTlsFiles) -> Result<rustls::ClientConfig, CertError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(load_roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| CertError::Tls(format!("{}: {e}", files.key.display())))?;
    config.alpn_protocols = vec![fedslm_protocol::ALPN.to_vec()];
    Ok(config)
}

/// A client that trusts the federation CA at `ca` and presents no certificate: what a stranger to the
/// federation has, for tests and load benchmarks of what the server gives strangers.
pub fn stranger_client_config(ca: &Path) -> Result<rustls::ClientConfig, CertError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(load_roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![fedslm_protocol::ALPN.to_vec()];
    Ok(config)
}

/// What identifies one version of the CRL file: a rename gives a new inode, a rewrite a new time or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Result<FileStamp, CertError> {
    let meta = fs::metadata(path).map_err(CertError::read(path))?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

struct Current {
    stamp: Option<FileStamp>,
    /// Counts the CRL's loads, whoever triggered them (a handshake, or [`ReloadingClientVerifier::refresh`]).
    generation: u64,
    verifier: Result<Arc<dyn ClientCertVerifier>, String>,
}

/// rustls's WebPKI client verifier, rebuilt whenever the CRL file changes, so that a revocation takes
/// effect at the next handshake without restarting the server.
///
/// Fails closed: while the CRL cannot be read, every client certificate is refused with an error naming it.
pub struct ReloadingClientVerifier {
    roots: Arc<RootCertStore>,
    crl_path: PathBuf,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    current: Mutex<Current>,
}

impl fmt::Debug for ReloadingClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingClientVerifier")
            .field("crl_path", &self.crl_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingClientVerifier {
    /// Fails if the CRL cannot be loaded now: a server should not start without one.
    pub fn new(
        roots: Arc<RootCertStore>,
        crl_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingClientVerifier, CertError> {
        let hints = roots.subjects();
        let v = ReloadingClientVerifier {
            roots,
            crl_path,
            provider,
            hints,
            current: Mutex::new(Current {
                stamp: None,
                generation: 0,
                verifier: Err("not loaded".into()),
            }),
        };
        let stamp = stamp(&v.crl_path)?;
        let inner = v.build()?;
        if let Ok(mut cur) = v.current.lock() {
            *cur = Current {
                stamp: Some(stamp),
                generation: 0,
                verifier: Ok(inner),
            };
        }
        Ok(v)
    }

    fn build(&self) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
        let crl = load_crl(&self.crl_path)?;
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .with_crls([crl])
            .build()
            .map_err(|e| CertError::malformed(&self.crl_path, e))
    }

    /// Reloads the CRL if its file changed since it was last read; returns how many times it has been
    /// loaded since the server started, so that a caller that remembers the number learns of every change,
    /// also of one a handshake loaded first.
    pub fn refresh(&self) -> u64 {
        let _ = self.verifier();
        self.current.lock().map_or(0, |cur| cur.generation)
    }

    /// Whether the CRL now loaded revokes the certificate of `chain` (its end entity first): only a
    /// definite revocation counts, not an unreadable CRL (which refuses new handshakes, but does not drop the
    /// centres already connected) nor an expiry.
    pub fn revoked(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return false;
        };
        let Ok(verifier) = self.verifier() else {
            return false;
        };
        matches!(
            verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        )
    }

    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let mut cur = self
            .current
            .lock()
            .map_err(|_| rustls::Error::General("certificate verifier lock poisoned".into()))?;
        let now = stamp(&self.crl_path).ok();
        if now.is_none() || now != cur.stamp {
            cur.stamp = now;
            cur.generation += 1;
            cur.verifier = self.build().map_err(|e| e.to_string());
            match &cur.verifier {
                Ok(_) => {
                    tracing::info!(crl = %self.crl_path.display(), "reloaded the federation CRL")
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the federation CRL; refusing all clients until it is fixed")
                }
            }
        }
        cur.verifier
            .clone()
            .map_err(|e| rustls::Error::General(format!("revocation list unavailable: {e}")))
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
