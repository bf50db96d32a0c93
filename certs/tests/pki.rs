use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fedslm_certs::*;
use fedslm_protocol::CenterId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

fn id(s: &str) -> CenterId {
    CenterId::new(s).unwrap()
}

fn init(dir: &Path) -> Pki {
    Pki::init(
        dir,
        "rectal-slm",
        "localhost",
        &["127.0.0.1".parse().unwrap()],
    )
    .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn crl_serials(pki: &Pki) -> Vec<String> {
    let der = CertificateRevocationListDer::from_pem_file(pki.crl_path()).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

#[test]
fn init_writes_the_federation_and_keeps_keys_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let pki = init(&dir);
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "crl.pem",
        "revoked.toml",
        "federation.toml",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    assert_eq!(pki.federation(), "rectal-slm");
    assert!(crl_serials(&pki).is_empty());
    let e = Pki::init(&dir, "x", "localhost", &[]).unwrap_err();
    assert!(matches!(e, CertError::AlreadyExists { .. }), "{e}");
}

#[test]
fn open_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Pki::open(&tmp.path().join("nope")).unwrap_err().to_string();
    assert!(
        e.contains("does not exist") && e.contains("fedslm certs init"),
        "{e}"
    );
    let e = Pki::open(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("federation.toml is missing"), "{e}");
}

#[test]
fn issued_certificates_name_their_center() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init(&tmp.path().join("pki"));
    let files = pki
        .issue(
            &id("center-a"),
            &tmp.path().join("a"),
            IssueOptions::days(30).unwrap(),
        )
        .unwrap();
    assert_eq!(mode(&files.key), 0o600);
    let der = CertificateDer::from_pem_file(&files.cert).unwrap();
    assert_eq!(center_of(&der).unwrap(), id("center-a"));
    // The server certificate names no centre.
    let server = CertificateDer::from_pem_file(tmp.path().join("pki/server.pem")).unwrap();
    assert!(matches!(
        center_of(&server),
        Err(CertError::NoCenterIdentity)
    ));
    let listed = pki.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].serial, files.issued.serial);
    assert_eq!(listed[0].center, id("center-a"));
    assert!(listed[0].revoked_at.is_none());
}

#[test]
fn a_csr_is_signed_for_the_center_the_coordinator_names() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init(&tmp.path().join("pki"));
    let site = tmp.path().join("site");
    let req = request(&id("center-b"), &site).unwrap();
    assert_eq!(mode(&req.key), 0o600);
    let out = tmp.path().join("issued.pem");
    // The site asks to be center-b; the coordinating centre enrols it as center-c.
    let signed = pki
        .sign_csr(
            &req.csr,
            &id("center-c"),
            &out,
            IssueOptions::days(10).unwrap(),
        )
        .unwrap();
    assert_eq!(signed.requested_center.as_deref(), Some("center-b"));
    let der = CertificateDer::from_pem_file(&out).unwrap();
    assert_eq!(center_of(&der).unwrap(), id("center-c"));
    // The certificate holds the site's key: the public key in it is the CSR's.
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&req.key).unwrap()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    let same = pki
        .sign_csr(
            &req.csr,
            &id("center-b"),
            &out,
            IssueOptions::days(10).unwrap(),
        )
        .unwrap();
    assert_eq!(same.requested_center, None);
}

#[test]
fn bad_csrs_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init(&tmp.path().join("pki"));
    let out = tmp.path().join("x.pem");
    let junk = tmp.path().join("junk.csr");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    let e = pki
        .sign_csr(&junk, &id("a"), &out, IssueOptions::days(1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("junk.csr is not a valid certificate signing request"),
        "{e}"
    );

    // A real CSR with one byte of its signed content changed: the signature no longer verifies.
    let req = request(&id("a"), &tmp.path().join("site")).unwrap();
    let pem = std::fs::read_to_string(&req.csr).unwrap();
    let der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let at = bytes.windows(6).position(|w| w == b"fedslm").unwrap();
    bytes[at] = b'F';
    let tampered = tmp.path().join("tampered.csr");
    std::fs::write(&tampered, pem_encode("CERTIFICATE REQUEST", &bytes)).unwrap();
    let e = pki
        .sign_csr(&tampered, &id("a"), &out, IssueOptions::days(1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("signature does not verify"), "{e}");
    assert!(!out.exists());
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[test]
fn revocation_goes_into_a_signed_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init(&tmp.path().join("pki"));
    let a = pki
        .issue(
            &id("center-a"),
            &tmp.path().join("a"),
            IssueOptions::days(30).unwrap(),
        )
        .unwrap();
    let b = pki
        .issue(
            &id("center-b"),
            &tmp.path().join("b"),
            IssueOptions::days(30).unwrap(),
        )
        .unwrap();

    let e = pki
        .revoke(&RevokeTarget::Center(id("center-z")))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "no certificate was issued to centre center-z; issued centres: center-a, center-b"
    );
    let e = pki
        .revoke(&RevokeTarget::Serial("abcd".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no certificate with serial abcd"), "{e}");
    assert!(pki.revoke(&RevokeTarget::Serial("xyz".into())).is_err());

    let revoked = pki.revoke(&RevokeTarget::Center(id("center-a"))).unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(crl_serials(&pki), vec![a.issued.serial.clone()]);
    // Serial given in the colon form that openssl prints, upper case.
    let colon: Vec<String> = b
        .issued
        .serial
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
        .collect();
    pki.revoke(&RevokeTarget::Serial(colon.join(":"))).unwrap();
    let mut serials = crl_serials(&pki);
    serials.sort();
    let mut want = vec![a.issued.serial.clone(), b.issued.serial.clone()];
    want.sort();
    assert_eq!(serials, want);
    assert!(pki.list().unwrap().iter().all(|c| c.revoked_at.is_some()));
    let e = pki
        .revoke(&RevokeTarget::Center(id("center-a")))
        .unwrap_err();
    assert!(matches!(e, CertError::AlreadyRevoked { .. }), "{e}");
}

#[test]
fn validity_is_bounded() {
    assert!(IssueOptions::days(0).is_err());
    assert!(IssueOptions::days(MAX_DAYS + 1).is_err());
    assert!(IssueOptions::days(365).is_ok());
}
