//! The TCP transport on loopback with the federation's real TLS configurations: streams both ways, and QUIC's
//! close semantics (code, reason, data before the close still readable).

use std::time::Duration;

use fedslm_certs::{
    client_config, server_config, ClientTlsFiles, IssueOptions, Pki, ServerTlsFiles,
};
use fedslm_transport::{tcp, Closed, Link, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Pair {
    _dir: tempfile::TempDir,
    client: Link,
    server: Link,
}

async fn pair() -> Pair {
    pair_with(|_| {}).await.unwrap()
}

/// A connected pair, the client's TLS configuration changed by `client` first; the client's and the
/// server's errors if they do not connect.
async fn pair_with(
    client: impl FnOnce(&mut rustls::ClientConfig),
) -> Result<Pair, (tcp::TcpError, tcp::AcceptFailure)> {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "test", "localhost", &[]).unwrap();
    let center: fedslm_protocol::CenterId = "center-a".parse().unwrap();
    let files = pki
        .issue(
            &center,
            &dir.path().join("a"),
            IssueOptions::days(1).unwrap(),
        )
        .unwrap();
    let server_tls = server_config(&ServerTlsFiles::in_pki(&dir.path().join("pki"))).unwrap();
    let mut client_tls = client_config(&ClientTlsFiles {
        ca: files.ca,
        cert: files.cert,
        key: files.key,
    })
    .unwrap();
    client(&mut client_tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tcp::acceptor(server_tls);
    let accepting = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tcp::accept(stream, &acceptor).await
    });
    let client = tcp::connect(
        &addr,
        None,
        std::sync::Arc::new(client_tls),
        "localhost",
        Duration::from_secs(5),
    )
    .await;
    match (client, accepting.await.unwrap()) {
        (Ok(client), Ok(server)) => Ok(Pair {
            _dir: dir,
            client,
            server,
        }),
        (Err(c), Err(s)) => Err((c, s)),
        (c, s) => panic!("one side connected: {:?} / {:?}", c.err(), s.err()),
    }
}

#[tokio::test]
async fn alpn_is_strict_as_over_quic_and_its_alert_reaches_the_client() {
    for offered in [vec![b"h2".to_vec()], vec![]] {
        let Err((client, server)) = pair_with(|c| c.alpn_protocols = offered.clone()).await else {
            panic!("a client offering {offered:?} connected")
        };
        assert!(
            matches!(
                client,
                tcp::TcpError::Tls {
                    alert: Some(120),
                    ..
                }
            ),
            "{client}"
        );
        assert_eq!(server.alert, Some(120));
    }
}

#[tokio::test]
async fn streams_go_both_ways_and_the_peer_is_known_by_its_certificate() {
    let p = pair().await;
    assert_eq!(p.client.transport(), Transport::Tcp);
    let chain = p.server.peer_chain();
    assert_eq!(
        fedslm_certs::peer_center(&chain).unwrap().to_string(),
        "center-a"
    );
    // The client opens (its control stream), the server opens (a task).
    let (mut cs, _cr) = p.client.open_bi().await.unwrap();
    cs.write_all(b"hello").await.unwrap();
    let (_ss, mut sr) = p.server.accept_bi().await.unwrap();
    let mut got = [0u8; 5];
    sr.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    let (mut ts, mut tr) = p.server.open_bi().await.unwrap();
    // Written while the client reads: flow control holds the rest back until it does.
    let writing = tokio::spawn(async move {
        ts.write_chunk(bytes::Bytes::from(vec![7u8; 3 << 20]))
            .await
            .unwrap();
        ts.finish().await;
    });
    let (mut ans, mut task) = p.client.accept_bi().await.unwrap();
    let mut all = Vec::new();
    task.read_to_end(&mut all).await.unwrap();
    assert_eq!(
        all.len(),
        3 << 20,
        "a 3 MiB frame beyond yamux's first window"
    );
    writing.await.unwrap();
    ans.write_all(b"done").await.unwrap();
    ans.finish().await;
    let mut back = String::new();
    tr.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "done");
    let (rx, tx) = p.server.bytes();
    assert!(rx > 4 && tx > 3 << 20, "counted: {rx} in, {tx} out");
}

#[tokio::test]
async fn a_close_carries_its_code_and_reason_after_the_data_sent_before_it() {
    let p = pair().await;
    let (mut cs, mut cr) = p.client.open_bi().await.unwrap();
    cs.write_all(b"Hello").await.unwrap();
    let (mut ss, mut sr) = p.server.accept_bi().await.unwrap();
    let mut got = [0u8; 5];
    sr.read_exact(&mut got).await.unwrap();
    // The server refuses: an answer on the stream, then a close with code 1.
    ss.write_all(b"Error: not enrolled").await.unwrap();
    ss.finish().await;
    p.server.close(1, b"not enrolled");
    assert_eq!(p.server.close_reason(), Some(Closed::Locally));
    let mut answer = String::new();
    cr.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "Error: not enrolled");
    let closed = tokio::time::timeout(Duration::from_secs(5), p.client.closed())
        .await
        .expect("the client learns of the close");
    assert_eq!(
        closed,
        Closed::Application {
            code: 1,
            reason: "not enrolled".into()
        }
    );
    // The closing side ends once the peer has closed too, well before its linger.
    let ended = tokio::time::timeout(Duration::from_secs(1), p.server.closed()).await;
    assert_eq!(ended, Ok(Closed::Locally));
    assert!(p.client.open_bi().await.is_err());
}

#[tokio::test]
async fn a_peer_that_vanishes_ends_the_connection_without_a_reason_of_its_own() {
    let p = pair().await;
    let Pair {
        client,
        server,
        _dir,
    } = p;
    drop(server);
    let closed = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    // Dropping every handle closes with code 0, as a dropped QUIC connection does.
    assert_eq!(
        closed,
        Closed::Application {
            code: 0,
            reason: String::new()
        }
    );
}

#[tokio::test]
async fn an_idle_connection_keeps_its_path_alive_with_keepalives() {
    let p = pair().await;
    // Let the first keep-alives (sent at once) arrive, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = p.client.bytes();
    // Nothing is sent by either side's streams; each side's keep-alive (every 5 s) still reaches the other.
    let started = std::time::Instant::now();
    while p.client.bytes().0 == before {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no keep-alive from the server within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.client.close_reason(), None);
}
