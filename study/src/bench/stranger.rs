//! A stranger's load on a fedslm server, from QUIC packets made by hand: Initials of connections that never go
//! on (half-open handshakes), either from an address that answers nothing (as a spoofed source would) or
//! after answering the server's Retry (a validated address), and whole handshakes without a certificate. For
//! the load benchmark (`fedslm bench flood`) and the tests of what strangers cost the server.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::{ClientConfig, Connection, ConnectionHandle, DatagramEvent, Endpoint};

use super::failed;
use crate::StudyError;

/// QUIC v1 long-header packet types (RFC 9000 §17.2).
const LONG_HEADER: u8 = 0x80;
const RETRY: u8 = 3;

/// Connections the server answered, by how (each counted once, by the connection id it answered to).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Answers {
    /// With a Retry: the server kept no state.
    pub retry: usize,
    /// With its handshake (Initial or Handshake packets): the server holds a connection.
    pub handshake: usize,
    /// Whole handshakes the server refused for want of a certificate.
    pub refused: usize,
}

/// One UDP socket's worth of stranger: connections started from it, none of them finished.
pub struct Stranger {
    socket: UdpSocket,
    server: SocketAddr,
    config: ClientConfig,
    endpoint: Endpoint,
    /// Connections still listening for a Retry, to answer it.
    pending: HashMap<ConnectionHandle, Connection>,
}

impl Stranger {
    /// A stranger to the server at `server` that trusts the federation CA at `ca` and has no certificate.
    pub fn new(server: SocketAddr, ca: &Path) -> Result<Stranger, StudyError> {
        let tls = fedslm_certs::stranger_client_config(ca)?;
        let config = fedslm_certs::quic_client_config(tls)?;
        let local = if server.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([127, 0, 0, 1], 0))
        };
        // Large buffers, so that a burst of the server's answers is counted, not dropped by the kernel.
        let socket = fedslm_certs::udp_socket(local).map_err(failed("cannot bind a UDP socket"))?;
        Ok(Stranger {
            socket,
            server,
            config,
            endpoint: Endpoint::new(Arc::default(), None, false, None),
            pending: HashMap::new(),
        })
    }

    /// Sends the first Initial of `n` new connections and forgets them: what a flood from spoofed source
    /// addresses costs the server (it cannot tell them apart from this one's until they answer a Retry).
    pub fn initials(&mut self, n: usize) -> Result<(), StudyError> {
        for _ in 0..n {
            let (_, mut connection) = self.connect()?;
            self.send(&mut connection)?;
            // A fresh endpoint now and then: the forgotten connections' ids would fill this one.
            if self.pending.is_empty() && self.endpoint_full() {
                self.endpoint = Endpoint::new(Arc::default(), None, false, None);
            }
        }
        Ok(())
    }

    /// Starts `n` connections that answer the server's Retry (so their address is validated) and then stop:
    /// each would hold a handshake at the server until its timeout.
    pub fn validated(&mut self, n: usize) -> Result<(), StudyError> {
        for _ in 0..n {
            let (handle, mut connection) = self.connect()?;
            self.send(&mut connection)?;
            self.pending.insert(handle, connection);
        }
        Ok(())
    }

    /// Reads what the server sends for `wait`: answers every Retry of a connection started by
    /// [`Stranger::validated`], answers nothing else, and counts the connections answered.
    pub fn listen(&mut self, wait: Duration) -> Result<Answers, StudyError> {
        let until = Instant::now() + wait;
        let mut retried = HashSet::new();
        let mut handshakes = HashSet::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(failed("cannot set a read timeout"))?;
            let (len, from) = match self.socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(failed("cannot receive")(e)),
            };
            let Some((kind, dcid)) = long_header(&buf[..len]) else {
                continue;
            };
            if kind == RETRY {
                retried.insert(dcid);
                self.answer_retry(from, &buf[..len])?;
            } else {
                handshakes.insert(dcid);
            }
        }
        Ok(Answers {
            retry: retried.len(),
            handshake: handshakes.len(),
            refused: 0,
        })
    }

    fn connect(&mut self) -> Result<(ConnectionHandle, Connection), StudyError> {
        self.endpoint
            .connect(
                Instant::now(),
                self.config.clone(),
                self.server,
                "localhost",
            )
            .map_err(|e| StudyError::Failed(format!("cannot start a connection: {e}")))
    }

    fn endpoint_full(&self) -> bool {
        // Checked every call; the endpoint is replaced well before quinn-proto would run out of ids.
        self.endpoint.open_connections() >= 10_000
    }

    /// Sends what `connection` has to send now.
    fn send(&self, connection: &mut Connection) -> Result<(), StudyError> {
        let mut out = Vec::with_capacity(1500);
        while let Some(t) = connection.poll_transmit(Instant::now(), 1, &mut out) {
            self.socket
                .send_to(&out[..t.size], t.destination)
                .map_err(failed("cannot send"))?;
            out.clear();
        }
        Ok(())
    }

    /// Hands a Retry to its connection, which sends its Initial again with the server's token.
    fn answer_retry(&mut self, from: SocketAddr, datagram: &[u8]) -> Result<(), StudyError> {
        let mut response = Vec::new();
        let event = self.endpoint.handle(
            Instant::now(),
            from,
            None,
            None,
            bytes::BytesMut::from(datagram),
            &mut response,
        );
        if let Some(DatagramEvent::ConnectionEvent(handle, event)) = event {
            if let Some(mut connection) = self.pending.remove(&handle) {
                connection.handle_event(event);
                self.send(&mut connection)?;
                // Kept (and never driven again): dropping it would not tell the server anything either.
                self.pending.insert(handle, connection);
            }
        }
        Ok(())
    }
}

/// A QUIC v1 long-header packet's type and destination connection id.
fn long_header(p: &[u8]) -> Option<(u8, Vec<u8>)> {
    let first = *p.first()?;
    if first & LONG_HEADER == 0 || p.get(1..5)? != [0, 0, 0, 1] {
        return None;
    }
    let kind = (first >> 4) & 0x03;
    let len = *p.get(5)? as usize;
    Some((kind, p.get(6..6 + len)?.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_headers_are_read_and_anything_else_is_not() {
        let retry = [0xf0, 0, 0, 0, 1, 2, 0xaa, 0xbb, 0];
        assert_eq!(long_header(&retry), Some((RETRY, vec![0xaa, 0xbb])));
        let initial = [0xc3, 0, 0, 0, 1, 1, 7];
        assert_eq!(long_header(&initial), Some((0, vec![7])));
        assert_eq!(long_header(&[0x40, 1, 2, 3]), None, "a short header");
        assert_eq!(long_header(&[0xc0, 0, 0, 0, 2, 0]), None, "another version");
        assert_eq!(long_header(&[0xc0, 0, 0, 0, 1, 9, 1]), None, "cut short");
    }
}
