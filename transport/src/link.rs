//! One connection to a peer and its streams, over QUIC or over TLS on TCP: what the node and the server use.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::tcp::{Mux, MuxStream};
use crate::{Closed, Transport};

/// How long a stream's failure waits for its connection to say why it closed: over TCP the close record or
/// the TLS alert is read by the connection's driver a moment after the streams see their end.
const REASON_WITHIN: Duration = Duration::from_millis(500);
/// The most a stream's finish may wait for the multiplexer to take it.
const FINISH_WITHIN: Duration = Duration::from_secs(5);

/// An established connection (TLS done) to a peer. Cheap to clone: clones are the same connection.
#[derive(Clone)]
pub struct Link(Inner);

#[derive(Clone)]
enum Inner {
    Quic {
        connection: quinn::Connection,
        /// A client's own endpoint, closed with its connection.
        endpoint: Option<quinn::Endpoint>,
    },
    Tcp(Arc<Mux>),
}

impl Link {
    /// A QUIC connection; `endpoint` when it is the caller's own (a client), to wait for its close to leave.
    pub fn quic(connection: quinn::Connection, endpoint: Option<quinn::Endpoint>) -> Link {
        Link(Inner::Quic {
            connection,
            endpoint,
        })
    }

    pub(crate) fn tcp(mux: Arc<Mux>) -> Link {
        Link(Inner::Tcp(mux))
    }

    pub fn transport(&self) -> Transport {
        match &self.0 {
            Inner::Quic { .. } => Transport::Quic,
            Inner::Tcp(_) => Transport::Tcp,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf), Closed> {
        match &self.0 {
            Inner::Quic { connection, .. } => {
                let (s, r) = connection.open_bi().await?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            Inner::Tcp(mux) => Ok(halves(mux.open().await?)),
        }
    }

    /// The next bidirectional stream the peer opens.
    pub async fn accept_bi(&self) -> Result<(SendHalf, RecvHalf), Closed> {
        match &self.0 {
            Inner::Quic { connection, .. } => {
                let (s, r) = connection.accept_bi().await?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            Inner::Tcp(mux) => Ok(halves(mux.accept().await?)),
        }
    }

    /// Closes the connection with an application `code` and `reason`, as QUIC does: at once, without waiting.
    pub fn close(&self, code: u32, reason: &[u8]) {
        match &self.0 {
            Inner::Quic { connection, .. } => connection.close(VarInt::from_u32(code), reason),
            Inner::Tcp(mux) => mux.close(code, reason),
        }
    }

    /// Closes it and waits (at most `within`) for the close to reach the peer.
    pub async fn close_and_wait(&self, code: u32, reason: &[u8], within: Duration) {
        self.close(code, reason);
        let wait = async {
            match &self.0 {
                Inner::Quic {
                    endpoint: Some(endpoint),
                    ..
                } => endpoint.wait_idle().await,
                _ => {
                    self.closed().await;
                }
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
    }

    /// Why the connection is over, if it is.
    pub fn close_reason(&self) -> Option<Closed> {
        match &self.0 {
            Inner::Quic { connection, .. } => connection.close_reason().map(Closed::from),
            Inner::Tcp(mux) => mux.reason(),
        }
    }

    /// Waits for the connection's end and says why.
    pub async fn closed(&self) -> Closed {
        match &self.0 {
            Inner::Quic { connection, .. } => connection.closed().await.into(),
            Inner::Tcp(mux) => mux.closed().await,
        }
    }

    /// After a stream failed: why the connection closed, if it did (waiting briefly for the reason to come
    /// in), or `None` when the stream failed on its own.
    pub async fn failure(&self) -> Option<Closed> {
        if let Some(reason) = self.close_reason() {
            return Some(reason);
        }
        tokio::time::timeout(REASON_WITHIN, self.closed())
            .await
            .ok()
    }

    pub fn remote_address(&self) -> SocketAddr {
        match &self.0 {
            Inner::Quic { connection, .. } => connection.remote_address(),
            Inner::Tcp(mux) => mux.remote,
        }
    }

    /// An identifier unique among this process's connections of both transports.
    pub fn id(&self) -> u64 {
        match &self.0 {
            Inner::Quic { connection, .. } => connection.stable_id() as u64 & !(1 << 63),
            Inner::Tcp(mux) => mux.id | (1 << 63),
        }
    }

    /// The peer's verified certificate chain, its end entity first (empty if it presented none).
    pub fn peer_chain(&self) -> Vec<CertificateDer<'static>> {
        match &self.0 {
            Inner::Quic { connection, .. } => {
                fedslm_certs::connection_chain(connection).unwrap_or_default()
            }
            Inner::Tcp(mux) => mux.chain.clone(),
        }
    }

    /// How much the peer may send that this side has not read yet, on the whole connection (QUIC's
    /// connection-level flow control; a smaller window takes effect as the data already allowed is read).
    /// Over TCP the multiplexer's own windows apply and this does nothing.
    pub fn set_receive_window(&self, bytes: u32) {
        if let Inner::Quic { connection, .. } = &self.0 {
            connection.set_receive_window(VarInt::from_u32(bytes));
        }
    }

    /// Bytes received and sent on the wire so far (UDP datagrams, or the TCP stream's TLS records).
    pub fn bytes(&self) -> (u64, u64) {
        match &self.0 {
            Inner::Quic { connection, .. } => {
                let stats = connection.stats();
                (stats.udp_rx.bytes, stats.udp_tx.bytes)
            }
            Inner::Tcp(mux) => mux.bytes(),
        }
    }
}

fn halves(stream: MuxStream) -> (SendHalf, RecvHalf) {
    let (r, w) = tokio::io::split(stream);
    (SendHalf::Tcp(w), RecvHalf::Tcp(r))
}

/// The sending half of a bidirectional stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
    Tcp(tokio::io::WriteHalf<MuxStream>),
}

/// The receiving half of a bidirectional stream.
pub enum RecvHalf {
    Quic(quinn::RecvStream),
    Tcp(tokio::io::ReadHalf<MuxStream>),
}

impl SendHalf {
    /// Writes `chunk` whole; over QUIC without copying it into the stream's buffer.
    pub async fn write_chunk(&mut self, chunk: bytes::Bytes) -> io::Result<()> {
        match self {
            SendHalf::Quic(s) => s.write_chunk(chunk).await.map_err(io::Error::from),
            SendHalf::Tcp(s) => s.write_all(&chunk).await,
        }
    }

    /// Writes `chunks` whole, in order; over QUIC without copying them into the stream's buffer.
    pub async fn write_chunks(&mut self, chunks: &[bytes::Bytes]) -> io::Result<()> {
        match self {
            SendHalf::Quic(s) => {
                let mut chunks = chunks.to_vec();
                s.write_all_chunks(&mut chunks)
                    .await
                    .map_err(io::Error::from)
            }
            SendHalf::Tcp(s) => {
                for c in chunks {
                    s.write_all(c).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends this side of the stream: the peer reads to its end.
    pub async fn finish(&mut self) {
        match self {
            SendHalf::Quic(s) => {
                let _ = s.finish();
            }
            SendHalf::Tcp(s) => {
                let _ = tokio::time::timeout(FINISH_WITHIN, s.shutdown()).await;
            }
        }
    }

    /// Waits until the peer has taken what was sent or stopped the stream (QUIC). Over TCP the bytes are
    /// ordered before the connection's close record, and the peer may read them after the close: at once.
    pub async fn stopped(&mut self) {
        if let SendHalf::Quic(s) = self {
            let _ = s.stopped().await;
        }
    }

    /// Abandons the stream: the peer's reads fail. Over TCP the stream is reset when both halves are dropped.
    pub fn reset(&mut self, code: u32) {
        if let SendHalf::Quic(s) = self {
            let _ = s.reset(VarInt::from_u32(code));
        }
    }
}

impl RecvHalf {
    /// Tells the peer to stop sending (QUIC); over TCP dropping both halves resets the stream.
    pub fn stop(&mut self, code: u32) {
        if let RecvHalf::Quic(r) = self {
            let _ = r.stop(VarInt::from_u32(code));
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            SendHalf::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_flush(Pin::new(s), cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_shutdown(Pin::new(s), cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvHalf::Quic(r) => AsyncRead::poll_read(Pin::new(r), cx, buf),
            RecvHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}
