//! The federation's PKI folder, kept by the coordinating centre, and the site's own key and CSR.
//!
//! ```text
//! PKI/federation.toml   federation name, server name and addresses
//! PKI/ca.pem            federation CA certificate: every centre and the server trust it
//! PKI/ca.key            CA private key (0600): never leaves the coordinating centre
//! PKI/server.pem, server.key
//! PKI/crl.pem           X.509 CRL signed by the CA; the server rereads it when it changes
//! PKI/revoked.toml      revoked serials and the CRL number
//! PKI/issued/SERIAL.pem a copy of every centre certificate issued
//! ```

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fedslm_protocol::hex::{from_hex, to_hex as hex};
use fedslm_protocol::CenterId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::error::CertError;
use crate::identity::{center_of, CENTER_URI_PREFIX};

const CA_DAYS: i64 = 3650;
const SERVER_DAYS: i64 = 825;
/// Longest validity `--days` accepts for a centre certificate: five years.
pub const MAX_DAYS: u32 = 1826;
/// A CRL's nextUpdate; the server does not treat an older CRL as stale, the field is informational.
const CRL_DAYS: i64 = 365;
/// Tolerated clock skew between the coordinating centre and the hospitals.
const BACKDATE: Duration = Duration::minutes(5);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (less a few minutes of clock skew) for `days` days.
    pub fn days(days: u32) -> Result<Validity, CertError> {
        if days == 0 || days > MAX_DAYS {
            return Err(CertError::BadValidity {
                days,
                max: MAX_DAYS,
            });
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(days)),
        })
    }
}

/// Which TLS role a certificate may play. Centres get `ClientAuth`; `ServerAuth` exists so that tests can
/// show the server refusing a centre certificate made for the wrong role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    ClientAuth,
    ServerAuth,
}

/// How to issue a centre certificate.
#[derive(Debug, Clone, Copy)]
pub struct IssueOptions {
    pub validity: Validity,
    pub usage: Usage,
}

impl IssueOptions {
    pub fn days(days: u32) -> Result<IssueOptions, CertError> {
        Ok(IssueOptions {
            validity: Validity::days(days)?,
            usage: Usage::ClientAuth,
        })
    }
}

/// A centre certificate as the PKI records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub center: CenterId,
    /// Serial number, lowercase hexadecimal.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// Files written for a centre by [`Pki::issue`].
#[derive(Debug, Clone)]
pub struct CenterFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub issued: IssuedCert,
}

/// Files written at a site by [`request`].
#[derive(Debug, Clone)]
pub struct RequestFiles {
    pub key: PathBuf,
    pub csr: PathBuf,
}

/// The result of [`Pki::sign_csr`].
#[derive(Debug, Clone)]
pub struct Signed {
    pub issued: IssuedCert,
    /// The centre id the CSR asked for, where it differs from the one issued.
    pub requested_center: Option<String>,
}

/// Which certificate to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// Every unrevoked certificate of this centre.
    Center(CenterId),
    Serial(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct FederationFile {
    name: String,
    server_name: String,
    server_ips: Vec<IpAddr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RevokedFile {
    crl_number: u64,
    #[serde(default)]
    revoked: Vec<RevokedEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevokedEntry {
    serial: String,
    center: String,
    revoked_at_unix: i64,
}

/// The server name that the PKI folder `dir` was made for (its `federation.toml`), if it can be read.
pub fn federation_server_name(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("federation.toml")).ok()?;
    toml::from_str::<FederationFile>(&text)
        .ok()
        .map(|f| f.server_name)
}

/// A federation PKI folder.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    federation: FederationFile,
}

impl Pki {
    /// Creates the federation CA, the server's key and certificate and an empty CRL in a new folder.
    pub fn init(
        dir: &Path,
        federation: &str,
        server_name: &str,
        server_ips: &[IpAddr],
    ) -> Result<Pki, CertError> {
        if dir.join("ca.key").exists() || dir.join("federation.toml").exists() {
            return Err(CertError::AlreadyExists {
                path: dir.to_path_buf(),
            });
        }
        if federation.trim().is_empty() {
            return Err(CertError::Tls("the federation name is empty".into()));
        }
        fs::create_dir_all(dir.join("issued")).map_err(CertError::write(dir))?;

        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn(&format!("fedslm {federation} federation CA"), federation);
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = now - BACKDATE;
        ca.not_after = now + Duration::days(CA_DAYS);
        ca.serial_number = Some(random_serial()?);
        let ca_cert = ca.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::default();
        server.distinguished_name = dn(server_name, federation);
        server.subject_alt_names = match server_name.parse::<IpAddr>() {
            Ok(ip) => vec![SanType::IpAddress(ip)],
            Err(_) => vec![SanType::DnsName(server_name.try_into().map_err(|_| {
                CertError::Tls(format!(
                    "server name {server_name:?} is not a valid DNS name"
                ))
            })?)],
        };
        server
            .subject_alt_names
            .extend(server_ips.iter().map(|ip| SanType::IpAddress(*ip)));
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.not_before = now - BACKDATE;
        server.not_after = now + Duration::days(SERVER_DAYS);
        server.serial_number = Some(random_serial()?);
        server.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&ca, &ca_key);
        let server_cert = server.signed_by(&server_key, &issuer)?;

        write_file(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
        write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), false)?;
        write_file(
            &dir.join("server.key"),
            server_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&dir.join("server.pem"), server_cert.pem().as_bytes(), false)?;
        let fed = FederationFile {
            name: federation.to_string(),
            server_name: server_name.to_string(),
            server_ips: server_ips.to_vec(),
        };
        let toml = toml::to_string(&fed).map_err(|e| CertError::Tls(e.to_string()))?;
        write_file(&dir.join("federation.toml"), toml.as_bytes(), false)?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            federation: fed,
        };
        pki.write_crl(RevokedFile::default())?;
        Ok(pki)
    }

    /// Opens an existing PKI folder.
    pub fn open(dir: &Path) -> Result<Pki, CertError> {
        if !dir.is_dir() {
            return Err(CertError::PkiMissing {
                path: dir.to_path_buf(),
            });
        }
        for missing in ["federation.toml", "ca.pem", "ca.key", "revoked.toml"] {
            if !dir.join(missing).is_file() {
                return Err(CertError::NotAPki {
                    path: dir.to_path_buf(),
                    missing,
                });
            }
        }
        let path = dir.join("federation.toml");
        let text = fs::read_to_string(&path).map_err(CertError::read(&path))?;
        let federation = toml::from_str(&text).map_err(|e| CertError::malformed(&path, e))?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            federation,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn federation(&self) -> &str {
        &self.federation.name
    }

    pub fn server_name(&self) -> &str {
        &self.federation.server_name
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let key_path = self.dir.join("ca.key");
        let key_pem = fs::read_to_string(&key_path).map_err(CertError::read(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::malformed(&key_path, e))?;
        let ca_path = self.ca_cert_path();
        let ca_pem = fs::read_to_string(&ca_path).map_err(CertError::read(&ca_path))?;
        Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CertError::malformed(&ca_path, e))
    }

    /// Makes a centre's key and certificate at once (simulations, tests, or a site that lets the
    /// coordinating centre generate its key). Writes `OUT/<id>.pem`, `OUT/<id>.key` and `OUT/ca.pem`.
    pub fn issue(
        &self,
        center: &CenterId,
        out_dir: &Path,
        options: IssueOptions,
    ) -> Result<CenterFiles, CertError> {
        let key = KeyPair::generate()?;
        let cert = self.sign_center(center, &key, options)?;
        fs::create_dir_all(out_dir).map_err(CertError::write(out_dir))?;
        let files = CenterFiles {
            cert: out_dir.join(format!("{center}.pem")),
            key: out_dir.join(format!("{center}.key")),
            ca: out_dir.join("ca.pem"),
            issued: cert,
        };
        write_file(&files.key, key.serialize_pem().as_bytes(), true)?;
        let pem = fs::read(self.issued_path(&files.issued.serial))
            .map_err(CertError::read(self.issued_path(&files.issued.serial)))?;
        write_file(&files.cert, &pem, false)?;
        let ca = fs::read(self.ca_cert_path()).map_err(CertError::read(self.ca_cert_path()))?;
        write_file(&files.ca, &ca, false)?;
        Ok(files)
    }

    /// Signs a site's CSR. The certificate names `center`, whatever the CSR asks for: a site cannot enrol
    /// itself as another centre. Only the CSR's public key is used.
    pub fn sign_csr(
        &self,
        csr_path: &Path,
        center: &CenterId,
        out: &Path,
        options: IssueOptions,
    ) -> Result<Signed, CertError> {
        let pem = fs::read_to_string(csr_path).map_err(CertError::read(csr_path))?;
        let csr =
            CertificateSigningRequestParams::from_pem(&pem).map_err(|e| CertError::BadCsr {
                path: csr_path.to_path_buf(),
                reason: match e {
                    rcgen::Error::CouldNotParseCertificationRequest => {
                        "not a PEM-encoded PKCS#10 request".to_string()
                    }
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        "its signature does not verify".to_string()
                    }
                    other => other.to_string(),
                },
            })?;
        let requested_center = csr
            .params
            .subject_alt_names
            .iter()
            .find_map(|san| match san {
                SanType::URI(uri) => uri
                    .as_str()
                    .strip_prefix(CENTER_URI_PREFIX)
                    .map(String::from),
                _ => None,
            })
            .filter(|asked| asked != center.as_str());
        let issued = self.sign_center(center, &csr.public_key, options)?;
        let pem = fs::read(self.issued_path(&issued.serial))
            .map_err(CertError::read(self.issued_path(&issued.serial)))?;
        write_file(out, &pem, false)?;
        Ok(Signed {
            issued,
            requested_center,
        })
    }

    fn sign_center(
        &self,
        center: &CenterId,
        public_key: &impl rcgen::PublicKeyData,
        options: IssueOptions,
    ) -> Result<IssuedCert, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(center.as_str(), &self.federation.name);
        params.subject_alt_names = vec![center_san(center)?];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match options.usage {
            Usage::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        params.not_before = options.validity.not_before;
        params.not_after = options.validity.not_after;
        let serial = random_serial()?;
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        write_file(&self.issued_path(&serial_hex), cert.pem().as_bytes(), false)?;
        Ok(IssuedCert {
            center: center.clone(),
            serial: serial_hex,
            not_before: options.validity.not_before,
            not_after: options.validity.not_after,
            revoked_at: None,
        })
    }

    fn issued_path(&self, serial: &str) -> PathBuf {
        self.dir.join("issued").join(format!("{serial}.pem"))
    }

    /// Every centre certificate issued, oldest expiry first, with its revocation status.
    pub fn list(&self) -> Result<Vec<IssuedCert>, CertError> {
        let revoked = self.read_revoked()?;
        let dir = self.dir.join("issued");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(CertError::read(&dir))? {
            let path = entry.map_err(CertError::read(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            let der =
                CertificateDer::from_pem_file(&path).map_err(|e| CertError::malformed(&path, e))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| CertError::malformed(&path, e))?;
            let serial = hex(cert.raw_serial());
            let time = |t: x509_parser::time::ASN1Time| t.to_datetime();
            out.push(IssuedCert {
                center: center_of(&der).map_err(|e| CertError::malformed(&path, e))?,
                not_before: time(cert.validity().not_before),
                not_after: time(cert.validity().not_after),
                revoked_at: revoked
                    .revoked
                    .iter()
                    .find(|r| r.serial == serial)
                    .and_then(|r| OffsetDateTime::from_unix_timestamp(r.revoked_at_unix).ok()),
                serial,
            });
        }
        out.sort_by(|a, b| (a.not_after, &a.serial).cmp(&(b.not_after, &b.serial)));
        Ok(out)
    }

    /// Revokes certificates and rewrites the CRL; returns what was revoked.
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<IssuedCert>, CertError> {
        let issued = self.list()?;
        let chosen: Vec<IssuedCert> = match target {
            RevokeTarget::Center(center) => {
                let of_center: Vec<_> = issued.iter().filter(|c| &c.center == center).collect();
                if of_center.is_empty() {
                    let mut known: Vec<&str> = issued.iter().map(|c| c.center.as_str()).collect();
                    known.sort_unstable();
                    known.dedup();
                    return Err(CertError::UnknownCenter {
                        center: center.clone(),
                        known: if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        },
                    });
                }
                let live: Vec<IssuedCert> = of_center
                    .iter()
                    .filter(|c| c.revoked_at.is_none())
                    .map(|c| (*c).clone())
                    .collect();
                if live.is_empty() {
                    return Err(CertError::AlreadyRevoked {
                        serial: of_center
                            .iter()
                            .map(|c| c.serial.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        center: center.to_string(),
                    });
                }
                live
            }
            RevokeTarget::Serial(serial) => {
                let want = normalize_serial(serial)?;
                let cert = issued
                    .iter()
                    .find(|c| c.serial == want)
                    .ok_or(CertError::UnknownSerial { serial: want })?;
                if cert.revoked_at.is_some() {
                    return Err(CertError::AlreadyRevoked {
                        serial: cert.serial.clone(),
                        center: cert.center.to_string(),
                    });
                }
                vec![cert.clone()]
            }
        };
        let now = OffsetDateTime::now_utc();
        let mut revoked = self.read_revoked()?;
        for cert in &chosen {
            revoked.revoked.push(RevokedEntry {
                serial: cert.serial.clone(),
                center: cert.center.to_string(),
                revoked_at_unix: now.unix_timestamp(),
            });
        }
        self.write_crl(revoked)?;
        Ok(chosen
            .into_iter()
            .map(|c| IssuedCert {
                revoked_at: Some(now),
                ..c
            })
            .collect())
    }

    fn read_revoked(&self) -> Result<RevokedFile, CertError> {
        let path = self.dir.join("revoked.toml");
        let text = fs::read_to_string(&path).map_err(CertError::read(&path))?;
        toml::from_str(&text).map_err(|e| CertError::malformed(&path, e))
    }

    /// Signs a new CRL (with the next CRL number) listing every revoked serial, then records it. The CRL is
    /// written first, atomically: a server never reads half a CRL.
    fn write_crl(&self, mut revoked: RevokedFile) -> Result<(), CertError> {
        revoked.crl_number += 1;
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for r in &revoked.revoked {
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from(unhex(&r.serial)?),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at_unix)
                    .map_err(|e| CertError::malformed(self.dir.join("revoked.toml"), e))?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let crl = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(revoked.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer()?)?;
        write_file(&self.crl_path(), crl.pem()?.as_bytes(), false)?;
        let toml = toml::to_string(&revoked).map_err(|e| CertError::Tls(e.to_string()))?;
        write_file(&self.dir.join("revoked.toml"), toml.as_bytes(), false)
    }
}

/// At a site: a new private key and a CSR for `center`, `OUT/<id>.key` (0600) and `OUT/<id>.csr`. The key never
/// leaves the site; the CSR goes to the coordinating centre for `certs sign`.
pub fn request(center: &CenterId, out_dir: &Path) -> Result<RequestFiles, CertError> {
    let files = RequestFiles {
        key: out_dir.join(format!("{center}.key")),
        csr: out_dir.join(format!("{center}.csr")),
    };
    if files.key.exists() {
        return Err(CertError::AlreadyExists { path: files.key });
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(center.as_str(), "fedslm");
    params.subject_alt_names = vec![center_san(center)?];
    let csr = params.serialize_request(&key)?;
    fs::create_dir_all(out_dir).map_err(CertError::write(out_dir))?;
    write_file(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_file(&files.csr, csr.pem()?.as_bytes(), false)?;
    Ok(files)
}

fn dn(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    dn
}

fn center_san(center: &CenterId) -> Result<SanType, CertError> {
    let uri = format!("{CENTER_URI_PREFIX}{center}");
    Ok(SanType::URI(uri.as_str().try_into()?))
}

/// 128 random bits, positive and without a leading zero byte, so its hex form is stable.
fn random_serial() -> Result<SerialNumber, CertError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Tls("the system random number generator failed".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn unhex(s: &str) -> Result<Vec<u8>, CertError> {
    from_hex(s).ok_or_else(|| CertError::BadSerial {
        serial: s.to_string(),
    })
}

/// Accepts `AB:12:...`, `ab12...`, with or without `0x`.
fn normalize_serial(s: &str) -> Result<String, CertError> {
    let cleaned: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    unhex(&cleaned).map(|b| hex(&b))
}

/// Writes a file atomically and durably (`fedslm_files`); private keys get mode 0600 from the start.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertError> {
    let access = if private {
        fedslm_files::Access::Private
    } else {
        fedslm_files::Access::Shared
    };
    fedslm_files::write_atomic_with(path, access, |w| w.write_all(bytes))
        .map_err(CertError::write(path))
}
