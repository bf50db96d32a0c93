//! Thin async helpers over the codec, for any `AsyncRead`/`AsyncWrite` (a QUIC stream, a TCP socket, a pipe).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, FrameHeader, HEADER_LEN};
use crate::error::ProtocolError;
use crate::limits::{ByteBudget, Limits};
use crate::message::Message;

/// The first allocation for a payload, whatever its header claims: the buffer grows only as bytes arrive, so a
/// peer that declares a large frame and sends nothing costs this much.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 * 1024;

/// Writes one message as a frame.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
    limits: &Limits,
) -> Result<(), ProtocolError> {
    let frame = codec::encode(msg, limits)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one message. A stream that ends before any byte of a header gives [`ProtocolError::Closed`]; one
/// that ends inside a frame gives [`ProtocolError::Truncated`].
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    budget: &ByteBudget,
) -> Result<Message, ProtocolError> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut raw[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ProtocolError::Closed
            } else {
                ProtocolError::Truncated {
                    expected: HEADER_LEN as u64,
                    got: got as u64,
                }
            });
        }
        got += n;
    }
    let header = FrameHeader::parse(&raw, limits)?;
    header.charge(budget)?;
    let len = header.payload_len;
    let mut payload = Vec::with_capacity((len as usize).min(INITIAL_PAYLOAD_CAPACITY));
    r.take(len).read_to_end(&mut payload).await?;
    if payload.len() as u64 != len {
        return Err(ProtocolError::Truncated {
            expected: len + HEADER_LEN as u64,
            got: (payload.len() + HEADER_LEN) as u64,
        });
    }
    codec::decode_payload(&header, payload.into(), limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ErrorCode, MessageKind};

    #[tokio::test]
    async fn round_trip_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let limits = Limits::default();
        let msg = Message::error(ErrorCode::Malformed, "bad");
        write_message(&mut a, &msg, &limits).await.unwrap();
        drop(a);
        let budget = ByteBudget::default();
        let got = read_message(&mut b, &limits, &budget).await.unwrap();
        assert_eq!(got, msg);
        assert!(matches!(
            read_message(&mut b, &limits, &budget).await,
            Err(ProtocolError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_truncated_not_closed() {
        let limits = Limits::default();
        let frame = codec::encode(&Message::error(ErrorCode::Internal, "x"), &limits).unwrap();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, frame.len() - 1] {
            let mut r = &frame[..cut];
            let e = read_message(&mut r, &limits, &ByteBudget::default())
                .await
                .unwrap_err();
            assert!(
                matches!(e, ProtocolError::Truncated { .. }),
                "cut {cut}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn the_budget_is_charged_per_frame() {
        let limits = Limits::default();
        let frame = codec::encode(&Message::error(ErrorCode::Internal, "x"), &limits).unwrap();
        let twice = [frame.clone(), frame.clone()].concat();
        let budget = ByteBudget::new(frame.len() as u64 + 3);
        let mut r = &twice[..];
        read_message(&mut r, &limits, &budget).await.unwrap();
        let e = read_message(&mut r, &limits, &budget).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::BudgetExceeded {
                    kind: MessageKind::Error,
                    remaining: 3,
                    ..
                }
            ),
            "{e}"
        );
    }
}
