//! What loopback QUIC with TLS itself costs (`fedslm bench rounds` prints it beside each round): a round's
//! bytes moved over the same transport and certificates with no protocol, no checks and no aggregation.
//!
//! A server endpoint (the server's own QUIC and TLS settings, on a runtime of its own, as the server process
//! has) sends `bytes` on a fresh stream to each of `centres` connected clients, which read them whole and send
//! them back, as echoing nodes do with a task; the time runs from the first byte sent to the last echo read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use fedslm_certs::ServerTlsFiles;

use super::failed;
use crate::simulate::configs::client_config;
use crate::StudyError;

/// Seconds to send `bytes` to each of `centres` clients and read them back, over loopback QUIC with the
/// federation's mutual TLS; certificates are made in `dir`.
pub fn echo_seconds(dir: &Path, centres: usize, bytes: usize) -> Result<f64, StudyError> {
    let (pki_dir, names) = super::bench_pki(dir, centres)?;
    let files = ServerTlsFiles::in_pki(&pki_dir);
    let server_quic = fedslm_certs::quic_server_config(fedslm_certs::server_config(&files)?)?;
    let endpoint_config = fedslm_certs::server_endpoint_config(&files)?;
    // Two runtimes, as the server process and the benchmark's nodes have.
    let server_rt = crate::error::runtime()?;
    let client_rt = crate::error::runtime()?;
    let socket = fedslm_certs::udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(failed("no UDP socket"))?;
    let endpoint = server_rt.block_on(async {
        let runtime = quinn::default_runtime()
            .ok_or_else(|| StudyError::Failed("no runtime for QUIC".into()))?;
        quinn::Endpoint::new(endpoint_config, Some(server_quic), socket, runtime)
            .map_err(failed("cannot bind"))
    })?;
    let addr = endpoint.local_addr().map_err(failed("no address"))?;
    let mut clients = Vec::new();
    for name in &names {
        // The nodes' own TLS files and settings.
        let node = client_config(dir, &pki_dir, name, None, addr)?;
        let tls = fedslm_certs::client_config(&node.tls)?;
        clients.push(fedslm_certs::quic_client_config(tls)?);
    }
    // The clients: connect, then echo one stream.
    let echoes = clients
        .into_iter()
        .map(|config| {
            client_rt.spawn(async move {
                let bind = SocketAddr::from(([127, 0, 0, 1], 0));
                let socket = fedslm_certs::udp_socket(bind).map_err(|e| e.to_string())?;
                let runtime = quinn::default_runtime().ok_or("no runtime")?;
                let client = quinn::Endpoint::new(Default::default(), None, socket, runtime)
                    .map_err(|e| e.to_string())?;
                let connection = client
                    .connect_with(config, addr, "localhost")
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let (mut send, mut recv) =
                    connection.accept_bi().await.map_err(|e| e.to_string())?;
                let data = recv.read_to_end(bytes).await.map_err(|e| e.to_string())?;
                send.write_chunk(Bytes::from(data))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = send.finish();
                let _ = send.stopped().await;
                connection.close(0u32.into(), b"done");
                client.wait_idle().await;
                Ok::<(), String>(())
            })
        })
        .collect::<Vec<_>>();
    let payload = Bytes::from(vec![7u8; bytes]);
    let seconds = server_rt.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..centres {
            let incoming = endpoint
                .accept()
                .await
                .ok_or_else(|| StudyError::Failed("the endpoint closed".into()))?;
            connections.push(incoming.await.map_err(failed("handshake"))?);
        }
        let start = Instant::now();
        let mut rounds = Vec::new();
        for connection in connections {
            let payload = payload.clone();
            rounds.push(tokio::spawn(async move {
                let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
                send.write_chunk(payload).await.map_err(|e| e.to_string())?;
                let _ = send.finish();
                let back = recv.read_to_end(bytes).await.map_err(|e| e.to_string())?;
                Ok::<usize, String>(back.len())
            }));
        }
        for r in rounds {
            let got = r
                .await
                .map_err(failed("a stream"))?
                .map_err(failed("a stream"))?;
            if got != bytes {
                return Err(StudyError::Failed(format!(
                    "{got} bytes came back of {bytes}"
                )));
            }
        }
        Ok::<f64, StudyError>(start.elapsed().as_secs_f64())
    })?;
    for echo in echoes {
        client_rt
            .block_on(echo)
            .map_err(failed("a client"))?
            .map_err(failed("a client"))?;
    }
    endpoint.close(0u32.into(), b"done");
    Ok(seconds)
}
