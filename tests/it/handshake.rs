//! The admission handshake over real QUIC and mutual TLS on loopback. Every refusal sits next to a positive
//! control on the same server, and each asserts what both sides see: the client's typed error and the
//! server's event.

use std::time::Duration;

use crate::common::{id, Federation, Transport};
use fedslm_certs::{IssueOptions, Pki, RevokeTarget, Usage, Validity};
use fedslm_client::diagnose::explain;
use fedslm_client::{client_config, connect, connect_with, ClientConfig, ClientError};
use fedslm_protocol::io::read_message;
use fedslm_protocol::{
    codec, ByteBudget, ErrorCode, Limits, Message, Role, SampleCounts, PROTOCOL_VERSION,
};
use fedslm_server::ServerEvent;

/// A test run over each transport: `$quic` over QUIC and `$tcp` over TLS on TCP, both calling `$body`.
macro_rules! both_transports {
    ($quic:ident, $tcp:ident, $body:ident) => {
        #[tokio::test]
        async fn $quic() {
            $body(Transport::Quic).await
        }

        #[tokio::test]
        async fn $tcp() {
            $body(Transport::Tcp).await
        }
    };
}

const TLS_UNKNOWN_CA: u8 = 48;
const TLS_CERTIFICATE_EXPIRED: u8 = 45;
const TLS_CERTIFICATE_REVOKED: u8 = 44;
const TLS_UNSUPPORTED_CERTIFICATE: u8 = 43;
const TLS_CERTIFICATE_REQUIRED: u8 = 116;
const TLS_NO_APPLICATION_PROTOCOL: u8 = 120;

fn tls_alert(e: &ClientError) -> u8 {
    match e {
        ClientError::TlsAlert { alert, .. } => *alert,
        other => panic!("expected a TLS alert, got: {other}"),
    }
}

fn refused(e: &ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Refused { code, message, .. } => (*code, message.clone()),
        other => panic!("expected a refusal, got: {other}"),
    }
}

both_transports!(
    a_valid_center_is_admitted_and_identified_by_its_certificate,
    a_valid_center_is_admitted_and_identified_by_its_certificate_over_tcp,
    a_valid_center_is_admitted_and_identified_by_its_certificate_over
);

async fn a_valid_center_is_admitted_and_identified_by_its_certificate_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    let session = connect(
        &fed.node("center-a"),
        SampleCounts {
            patients: 60,
            positives: 14,
            with_images: 60,
        },
    )
    .await
    .unwrap();
    assert_eq!(session.welcome.center, id("center-a"));
    assert_eq!(session.welcome.role, Role::Train);
    assert_eq!(
        (session.welcome.run_id.as_str(), session.welcome.rounds),
        ("run-7", 3)
    );
    match fed
        .expect(|e| matches!(e, ServerEvent::Admitted { .. }))
        .await
    {
        ServerEvent::Admitted { center, role, .. } => {
            assert_eq!((center, role), (id("center-a"), Role::Train))
        }
        _ => unreachable!(),
    }
    assert_eq!(fed.server.connected(), vec![id("center-a")]);

    let ext = connect(&fed.node("external"), SampleCounts::default())
        .await
        .unwrap();
    assert_eq!(ext.welcome.role, Role::Validate);
    fed.expect_admitted("external").await;
    assert_eq!(fed.server.connected(), vec![id("center-a"), id("external")]);

    session.close(0, "bye").await;
    fed.expect(
        |e| matches!(e, ServerEvent::Disconnected { center, .. } if *center == id("center-a")),
    )
    .await;
    assert_eq!(fed.server.connected(), vec![id("external")]);
}

both_transports!(
    no_client_certificate_is_refused_at_the_handshake,
    no_client_certificate_is_refused_at_the_handshake_over_tcp,
    no_client_certificate_is_refused_at_the_handshake_over
);

async fn no_client_certificate_is_refused_at_the_handshake_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let config = fed.node("center-b");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::pem::PemObject::from_pem_file(&config.tls.ca).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(fedslm_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![fedslm_protocol::ALPN.to_vec()];
    let e = connect_with(&config, tls, SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert_eq!(tls_alert(&e), TLS_CERTIFICATE_REQUIRED, "{e}");
    let (alert, _) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_CERTIFICATE_REQUIRED));
    fed.control("center-b").await;
}

both_transports!(
    a_certificate_from_another_ca_is_refused,
    a_certificate_from_another_ca_is_refused_over_tcp,
    a_certificate_from_another_ca_is_refused_over
);

async fn a_certificate_from_another_ca_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let other = Pki::init(&fed.dir.path().join("other-pki"), "rogue", "localhost", &[]).unwrap();
    let out = fed.node_dir("rogue");
    other
        .issue(&id("center-b"), &out, IssueOptions::days(30).unwrap())
        .unwrap();
    // The rogue node trusts the real CA, so only its own certificate is wrong.
    std::fs::copy(fed.pki.ca_cert_path(), out.join("ca.pem")).unwrap();
    let e = connect(
        &fed.config_for("center-b", "center-b", &out),
        SampleCounts::default(),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(tls_alert(&e), TLS_UNKNOWN_CA, "{e}");
    let (alert, reason) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_UNKNOWN_CA));
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    fed.control("center-b").await;
}

both_transports!(
    an_expired_certificate_is_refused,
    an_expired_certificate_is_refused_over_tcp,
    an_expired_certificate_is_refused_over
);

async fn an_expired_certificate_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let now = time::OffsetDateTime::now_utc();
    let expired = IssueOptions {
        validity: Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        },
        usage: Usage::ClientAuth,
    };
    let e = connect(&fed.node_with("center-b", expired), SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert_eq!(tls_alert(&e), TLS_CERTIFICATE_EXPIRED, "{e}");
    let (alert, reason) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_CERTIFICATE_EXPIRED));
    assert!(reason.contains("certificate expired"), "{reason}");
    fed.control("center-a").await;
}

both_transports!(
    a_revoked_certificate_is_refused_also_when_revoked_while_the_server_runs,
    a_revoked_certificate_is_refused_also_when_revoked_while_the_server_runs_over_tcp,
    a_revoked_certificate_is_refused_also_when_revoked_while_the_server_runs_over
);

async fn a_revoked_certificate_is_refused_also_when_revoked_while_the_server_runs_over(
    transport: Transport,
) {
    let mut fed = Federation::start_over(transport, "").await;
    let config_b = fed.node("center-b");
    // Admitted before the revocation: the positive control.
    let first = connect(&config_b, SampleCounts::default()).await.unwrap();
    fed.expect_admitted("center-b").await;
    first.close(0, "bye").await;

    fed.pki
        .revoke(&RevokeTarget::Center(id("center-b")))
        .unwrap();
    let e = connect(&config_b, SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert_eq!(tls_alert(&e), TLS_CERTIFICATE_REVOKED, "{e}");
    let (alert, reason) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_CERTIFICATE_REVOKED));
    assert!(reason.contains("Revoked"), "{reason}");
    // The others are still served, and a new certificate for the same centre works.
    fed.control("center-a").await;
    std::fs::remove_dir_all(fed.node_dir("center-b")).unwrap();
    fed.control("center-b").await;
}

both_transports!(
    a_connected_center_whose_certificate_is_revoked_is_closed_within_seconds,
    a_connected_center_whose_certificate_is_revoked_is_closed_within_seconds_over_tcp,
    a_connected_center_whose_certificate_is_revoked_is_closed_within_seconds_over
);

async fn a_connected_center_whose_certificate_is_revoked_is_closed_within_seconds_over(
    transport: Transport,
) {
    let mut fed = Federation::start_over(transport, "").await;
    let a = connect(&fed.node("center-a"), SampleCounts::default())
        .await
        .unwrap();
    fed.expect_admitted("center-a").await;
    let b = connect(&fed.node("center-b"), SampleCounts::default())
        .await
        .unwrap();
    fed.expect_admitted("center-b").await;
    let revoked_at = std::time::Instant::now();
    fed.pki
        .revoke(&RevokeTarget::Center(id("center-b")))
        .unwrap();
    let ServerEvent::Revoked { center, serial, .. } = fed
        .expect(|e| matches!(e, ServerEvent::Revoked { .. }))
        .await
    else {
        unreachable!()
    };
    assert_eq!(center, id("center-b"));
    assert_eq!(serial.len(), 32, "{serial}");
    assert!(revoked_at.elapsed() < Duration::from_secs(3));
    match b.wait_finish().await.err().unwrap() {
        ClientError::Closed { code, .. } => {
            assert_eq!(code, u64::from(fedslm_protocol::close::REVOKED))
        }
        other => panic!("{other}"),
    }
    // The other centre stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fed.server.connected(), vec![id("center-a")]);
    drop(a);
}

both_transports!(
    a_revoked_certificate_is_refused_by_a_server_started_after_the_revocation,
    a_revoked_certificate_is_refused_by_a_server_started_after_the_revocation_over_tcp,
    a_revoked_certificate_is_refused_by_a_server_started_after_the_revocation_over
);

async fn a_revoked_certificate_is_refused_by_a_server_started_after_the_revocation_over(
    transport: Transport,
) {
    let fed = Federation::start_over(transport, "").await;
    let config_b = fed.node("center-b");
    let config_a = fed.node("center-a");
    fed.pki
        .revoke(&RevokeTarget::Center(id("center-b")))
        .unwrap();
    // A second server, started now from the same PKI folder: it reads the CRL at start, not on a change.
    let mut later = Federation::restart(&fed).await;
    let later_addr = later.addr.to_string();
    let later_tcp = later.server.tcp_addr().unwrap().to_string();
    let to_later = |mut c: ClientConfig| {
        c.server = later_addr.clone();
        c.route.tcp_server = later_tcp.clone();
        c
    };
    let e = connect(&to_later(config_b), SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert_eq!(tls_alert(&e), TLS_CERTIFICATE_REVOKED, "{e}");
    let (alert, _) = later.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_CERTIFICATE_REVOKED));
    let ok = connect(&to_later(config_a), SampleCounts::default())
        .await
        .unwrap();
    later.expect_admitted("center-a").await;
    ok.close(0, "").await;
}

both_transports!(
    a_certificate_with_the_server_auth_usage_only_is_refused,
    a_certificate_with_the_server_auth_usage_only_is_refused_over_tcp,
    a_certificate_with_the_server_auth_usage_only_is_refused_over
);

async fn a_certificate_with_the_server_auth_usage_only_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let server_only = IssueOptions {
        validity: Validity::days(30).unwrap(),
        usage: Usage::ServerAuth,
    };
    let e = connect(
        &fed.node_with("center-b", server_only),
        SampleCounts::default(),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(tls_alert(&e), TLS_UNSUPPORTED_CERTIFICATE, "{e}");
    let (alert, reason) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_UNSUPPORTED_CERTIFICATE));
    assert!(
        reason.contains("does not allow extended key usage for client authentication"),
        "{reason}"
    );
    fed.control("center-a").await;
}

both_transports!(
    a_valid_certificate_of_a_center_not_enrolled_is_refused,
    a_valid_certificate_of_a_center_not_enrolled_is_refused_over_tcp,
    a_valid_certificate_of_a_center_not_enrolled_is_refused_over
);

async fn a_valid_certificate_of_a_center_not_enrolled_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let e = connect(&fed.node("center-z"), SampleCounts::default())
        .await
        .err()
        .unwrap();
    let (code, message) = refused(&e);
    assert_eq!(code, ErrorCode::NotEnrolled);
    assert_eq!(message, "centre center-z is not enrolled in run run-7");
    let (center, code, _) = fed.expect_refusal().await;
    assert_eq!((center, code), (id("center-z"), ErrorCode::NotEnrolled));
    assert!(fed.server.connected().is_empty());
    fed.control("center-b").await;
}

both_transports!(
    a_wrong_alpn_is_refused,
    a_wrong_alpn_is_refused_over_tcp,
    a_wrong_alpn_is_refused_over
);

async fn a_wrong_alpn_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    let config = fed.node("center-b");
    let mut tls = client_config(&config.tls).unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let e = connect_with(&config, tls, SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert_eq!(tls_alert(&e), TLS_NO_APPLICATION_PROTOCOL, "{e}");
    let (alert, _) = fed.expect_handshake_failure().await;
    assert_eq!(alert, Some(TLS_NO_APPLICATION_PROTOCOL));
    fed.control("center-b").await;
}

/// Sends `frame` as the first bytes of the control stream and returns the server's answer.
async fn raw_exchange(config: &ClientConfig, frame: &[u8]) -> Message {
    let conn = fedslm_client::open(config, client_config(&config.tls).unwrap())
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut send, frame)
        .await
        .unwrap();
    read_message(&mut recv, &Limits::default(), &ByteBudget::default())
        .await
        .unwrap()
}

fn hello_frame(config: &ClientConfig, header_version: u16, hello_version: u16) -> Vec<u8> {
    let mut hello = fedslm_client::hello(config, SampleCounts::default());
    hello.protocol_version = hello_version;
    let mut frame = codec::encode(&Message::Hello(hello), &Limits::default()).unwrap();
    frame[4..6].copy_from_slice(&header_version.to_le_bytes());
    frame
}

#[tokio::test]
async fn a_protocol_version_mismatch_is_refused() {
    let mut fed = Federation::start("").await;
    let config = fed.node("center-a");
    // Positive control through the same raw path.
    let ok = raw_exchange(
        &config,
        &hello_frame(&config, PROTOCOL_VERSION, PROTOCOL_VERSION),
    )
    .await;
    assert!(matches!(ok, Message::Welcome(_)), "{ok:?}");
    fed.expect_admitted("center-a").await;

    for (header, hello) in [
        (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1),
        (PROTOCOL_VERSION, 0),
    ] {
        let reply = raw_exchange(&config, &hello_frame(&config, header, hello)).await;
        let Message::Error(e) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(e.code, ErrorCode::UnsupportedVersion);
        let got = if header != PROTOCOL_VERSION {
            header
        } else {
            hello
        };
        assert_eq!(
            e.message,
            format!("protocol version {got} is not supported; this server speaks version {PROTOCOL_VERSION}")
        );
        let (center, code, _) = fed.expect_refusal().await;
        assert_eq!(
            (center, code),
            (id("center-a"), ErrorCode::UnsupportedVersion)
        );
    }
}

both_transports!(
    a_hello_claiming_another_center_is_refused,
    a_hello_claiming_another_center_is_refused_over_tcp,
    a_hello_claiming_another_center_is_refused_over
);

async fn a_hello_claiming_another_center_is_refused_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    fed.control("center-a").await;
    // center-a's certificate, but the Hello says center-b.
    let config = fed.config_for("center-b", "center-a", &fed.node_dir("center-a"));
    let e = connect(&config, SampleCounts::default())
        .await
        .err()
        .unwrap();
    let (code, message) = refused(&e);
    assert_eq!(code, ErrorCode::IdentityMismatch);
    assert_eq!(
        message,
        "Hello claims centre center-b, but the certificate is centre center-a's"
    );
    let (center, code, _) = fed.expect_refusal().await;
    assert_eq!(
        (center, code),
        (id("center-a"), ErrorCode::IdentityMismatch)
    );
    fed.control("center-a").await;
}

both_transports!(
    settings_that_differ_from_the_run_are_refused,
    settings_that_differ_from_the_run_are_refused_over_tcp,
    settings_that_differ_from_the_run_are_refused_over
);

async fn settings_that_differ_from_the_run_are_refused_over(transport: Transport) {
    let study = fedslm_cohort::ClinicalCoding::default();
    let preprocess = fedslm_cohort::PreprocessSettings::default();
    let run_hash = fedslm_protocol::hex::to_hex(&fedslm_cohort::settings_hash(&study, &preprocess));
    let mut fed =
        Federation::start_over(transport, &format!("settings_hash = \"{run_hash}\"")).await;
    let mut node = fed.node("center-a");
    let session = connect(&node, SampleCounts::default()).await.unwrap();
    fed.expect_admitted("center-a").await;
    session.close(0, "").await;

    // A centre that codes CEA with another cut-off.
    node.coding.cea_cutoff = 10.0;
    let e = connect(&node, SampleCounts::default()).await.err().unwrap();
    let (code, message) = refused(&e);
    assert_eq!(code, ErrorCode::SettingsMismatch);
    assert!(message.contains(&run_hash), "{message}");
}

#[tokio::test]
async fn a_misbehaving_peer_does_not_stop_the_server() {
    let mut fed = Federation::start("").await;
    let config = fed.node("center-a");
    // Garbage instead of a Hello.
    let reply = raw_exchange(&config, b"GET / HTTP/1.1\r\n\r\n").await;
    let Message::Error(e) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(e.code, ErrorCode::Malformed);
    assert!(e.message.contains("magic"), "{}", e.message);
    // A frame declaring more than a Hello may hold.
    let mut big = b"FSLM".to_vec();
    big.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    big.extend_from_slice(&[1, 0]);
    big.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let Message::Error(e) = raw_exchange(&config, &big).await else {
        panic!()
    };
    assert!(
        e.message.contains("the limit for Hello is 65536"),
        "{}",
        e.message
    );
    // Silent after the handshake: dropped after the Hello timeout, while others are served meanwhile.
    let silent = fedslm_client::open(&config, client_config(&config.tls).unwrap())
        .await
        .unwrap();
    fed.control("center-b").await;
    let reason = tokio::time::timeout(Duration::from_secs(10), silent.closed())
        .await
        .unwrap();
    assert!(
        reason.to_string().contains("no Hello within 2 s"),
        "{reason}"
    );
    fed.control("center-a").await;
}

both_transports!(
    a_second_connection_of_a_center_supersedes_the_first,
    a_second_connection_of_a_center_supersedes_the_first_over_tcp,
    a_second_connection_of_a_center_supersedes_the_first_over
);

async fn a_second_connection_of_a_center_supersedes_the_first_over(transport: Transport) {
    let mut fed = Federation::start_over(transport, "").await;
    let config = fed.node("center-a");
    let first = connect(&config, SampleCounts::default()).await.unwrap();
    fed.expect_admitted("center-a").await;
    let _second = connect(&config, SampleCounts::default()).await.unwrap();
    fed.expect_admitted("center-a").await;
    let e = first.wait_finish().await.err().unwrap();
    match e {
        ClientError::Closed { code, .. } => {
            assert_eq!(code, u64::from(fedslm_protocol::close::SUPERSEDED))
        }
        other => panic!("{other}"),
    }
    assert_eq!(fed.server.connected(), vec![id("center-a")]);
}

#[tokio::test]
async fn a_close_reason_that_forges_log_lines_reaches_the_log_escaped() {
    let mut fed = Federation::start("").await;
    let session = connect(&fed.node("center-a"), SampleCounts::default())
        .await
        .unwrap();
    fed.expect_admitted("center-a").await;
    let forged =
        "bye\n2026-11-30T00:00:00Z  INFO fedslm_server: run completed rounds=99\r\u{1b}[31m";
    session.close(0, forged).await;
    let ServerEvent::Disconnected { reason, .. } = fed
        .expect(|e| matches!(e, ServerEvent::Disconnected { .. }))
        .await
    else {
        unreachable!()
    };
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
    assert!(reason.contains("bye\\n2026"), "{reason:?}");
    fed.control("center-b").await;
}

/// A frame header declaring `len` payload bytes of `kind`, and nothing after it.
fn header_only(kind: fedslm_protocol::MessageKind, len: u64) -> Vec<u8> {
    let mut h = b"FSLM".to_vec();
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&[kind as u8, 0]);
    h.extend_from_slice(&len.to_le_bytes());
    h
}

#[tokio::test]
async fn a_frame_other_than_hello_before_the_hello_is_refused_from_its_header() {
    let mut fed = Federation::start("").await;
    let config = fed.node("center-a");
    // A FitResult of 100 MB (within a FitResult's own limit) as the first frame: refused at once from its
    // header, nothing of its payload awaited or buffered.
    let frame = header_only(fedslm_protocol::MessageKind::FitResult, 100 << 20);
    let reply = tokio::time::timeout(Duration::from_secs(1), raw_exchange(&config, &frame))
        .await
        .expect("refused from the header, not after the Hello timeout");
    let Message::Error(e) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(e.code, ErrorCode::Unexpected);
    assert_eq!(
        e.message,
        "FitResult frame where only Hello or StatusRequest may come"
    );
    fed.control("center-a").await;
}

#[tokio::test]
async fn an_admitted_center_may_send_only_an_error_on_its_control_stream() {
    let mut fed = Federation::start("").await;
    let config = fed.node("center-a");
    let conn = fedslm_client::open(&config, client_config(&config.tls).unwrap())
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = codec::encode(
        &Message::Hello(fedslm_client::hello(&config, SampleCounts::default())),
        &Limits::default(),
    )
    .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut send, &hello)
        .await
        .unwrap();
    let welcome = read_message(&mut recv, &Limits::default(), &ByteBudget::default())
        .await
        .unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    fed.expect_admitted("center-a").await;
    // 400 MB announced on the control stream, where only an Error may come: the connection is closed from
    // the header.
    let frame = header_only(fedslm_protocol::MessageKind::FitResult, 400 << 20);
    tokio::io::AsyncWriteExt::write_all(&mut send, &frame)
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .expect("closed from the header");
    assert!(
        closed
            .to_string()
            .contains("FitResult frame where only Error may come"),
        "{closed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_a_retry_then_a_handshake_within_the_limits_and_its_timeout() {
    use fedslm_study::bench::stranger::{Answers, Stranger};
    let mut fed = Federation::start("max_handshakes_per_address = 4").await;
    let config = fed.node("center-a");
    let server: std::net::SocketAddr = config.server.parse().unwrap();
    let ca = config.tls.ca.clone();
    let mut stranger = Stranger::new(server, &ca).unwrap();
    // 200 Initials from an address that answers nothing (as spoofed ones would): each gets a Retry, and the
    // server keeps nothing of them.
    let (mut stranger, answers) = tokio::task::spawn_blocking(move || {
        stranger.initials(200).unwrap();
        let answers = stranger.listen(Duration::from_millis(1500)).unwrap();
        (stranger, answers)
    })
    .await
    .unwrap();
    assert_eq!(
        answers,
        Answers {
            retry: 200,
            handshake: 0,
            refused: 0
        }
    );
    // Six that answer their Retry, from one address: four handshakes in flight from it, the others ignored.
    let answers = tokio::task::spawn_blocking(move || {
        stranger.validated(6).unwrap();
        stranger.listen(Duration::from_millis(1000)).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        answers,
        Answers {
            retry: 6,
            handshake: 4,
            refused: 0
        }
    );
    // The half-open handshakes end at the handshake timeout (2 s here), and a centre from the same address
    // comes in.
    let ServerEvent::HandshakeFailed { reason, .. } = fed
        .expect(|e| matches!(e, ServerEvent::HandshakeFailed { .. }))
        .await
    else {
        unreachable!()
    };
    assert_eq!(reason, "no handshake within 2 s");
    fed.control("center-a").await;
}

#[tokio::test]
async fn a_server_whose_certificate_is_not_the_federations_is_named_a_tls_inspecting_proxy() {
    // A stand-in for a TLS-inspecting middlebox: a server with a certificate from another CA, at the address
    // a centre of this federation dials.
    let fed = Federation::start("").await;
    let interceptor = Federation::start("").await;
    let mut config = fed.node("center-a");
    config.server = interceptor.server.local_addr().unwrap().to_string();
    let e = connect(&config, SampleCounts::default())
        .await
        .err()
        .unwrap();
    let f = explain(&e, Transport::Quic, &config.server, &config.server_name);
    assert_eq!(f.step, "TLS", "{e}");
    assert!(f.fix.contains("TLS-inspecting proxy"), "{}", f.fix);
    // Nothing listens: the UDP path.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    config.server = silent.local_addr().unwrap().to_string();
    let e = connect(&config, SampleCounts::default())
        .await
        .err()
        .unwrap();
    let f = explain(&e, Transport::Quic, &config.server, &config.server_name);
    assert_eq!(f.step, "UDP", "{e}");
}

/// A stand-in for a TLS-inspecting proxy: it answers HTTP CONNECT with 200, then speaks TLS itself with a
/// certificate of its own CA (`acceptor`'s), as such proxies do.
async fn inspecting_proxy(acceptor: fedslm_transport::tcp::Acceptor) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = fedslm_transport::tcp::accept(stream, &acceptor).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tls_inspecting_proxy_on_the_tcp_path_is_named_by_check_and_refused() {
    let fed = Federation::start_over(Transport::Tcp, "").await;
    let interceptor = Federation::start("").await;
    let theirs = fedslm_certs::server_config(&fedslm_certs::ServerTlsFiles::in_pki(
        &interceptor.dir.path().join("pki"),
    ))
    .unwrap();
    let proxy = inspecting_proxy(fedslm_transport::tcp::acceptor(theirs)).await;
    let mut config = fed.node("center-a");
    config.route.proxy =
        Some(fedslm_transport::Proxy::parse(&format!("http://{proxy}"), None).unwrap());
    // The node refuses the connection: the certificate it is shown is not the federation's.
    let e = connect(&config, SampleCounts::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::TlsAlert { .. }), "{e}");
    // `--check`: QUIC reaches the real server; the TCP path through the proxy meets the inspection.
    let checks = fedslm_client::diagnose::probe(&config, Duration::from_secs(10)).await;
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(checks[0].failed.is_none(), "{checks:?}");
    let f = checks[1].failed.clone().expect("the TCP path fails");
    assert_eq!(f.step, "TLS", "{f:?}");
    assert!(
        f.fix.contains("a TLS-inspecting proxy is in the way"),
        "{}",
        f.fix
    );
    assert!(
        f.fix.contains("ask for an exception for this host"),
        "{}",
        f.fix
    );
    // Without the proxy, the same node is admitted over TCP.
    config.route.proxy = None;
    let session = connect(&config, SampleCounts::default()).await.unwrap();
    assert_eq!(session.transport(), Transport::Tcp);
    session.close(0, "").await;
}
