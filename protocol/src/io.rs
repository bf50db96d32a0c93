//! Thin async helpers over the codec, for any `AsyncRead`/`AsyncWrite` (a QUIC stream, a TCP socket, a pipe).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, FrameHeader, HEADER_LEN};
use crate::error::ProtocolError;
use crate::limits::{ByteBudget, Limits};
use crate::message::{Message, MessageKind};

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

/// What a reader accepts on a stream in its present state, checked from the frame's header before any byte of
/// its payload is read: the kinds valid there, a payload limit below each kind's own, and how long the payload
/// may take once its header is in.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub kinds: &'a [MessageKind],
    pub max_payload: u64,
    pub payload_within: Option<Duration>,
    /// The reader holds memory for this frame (a permit of a few frames at once): its payload is one buffer
    /// of the declared length, allocated at once (its pages are touched only as bytes arrive), instead of a
    /// buffer that grows as they come, whose steps the allocator keeps.
    pub reserved: bool,
}

impl Expect<'static> {
    /// Any kind, each within its own limit, with no time limit.
    pub const ANY: Expect<'static> = Expect {
        kinds: &MessageKind::ALL,
        max_payload: u64::MAX,
        payload_within: None,
        reserved: false,
    };
}

impl<'a> Expect<'a> {
    /// Only `kinds`, each within its own limit, with no time limit.
    pub const fn only(kinds: &'a [MessageKind]) -> Expect<'a> {
        Expect {
            kinds,
            max_payload: u64::MAX,
            payload_within: None,
            reserved: false,
        }
    }

    /// At most `max_payload` bytes of payload.
    pub const fn at_most(self, max_payload: u64) -> Expect<'a> {
        Expect {
            max_payload,
            ..self
        }
    }

    /// The payload within `d` of its header.
    pub const fn within(self, d: Duration) -> Expect<'a> {
        Expect {
            payload_within: Some(d),
            ..self
        }
    }

    /// The payload in one buffer of its declared length, allocated at once: for a reader that holds memory
    /// for the frame.
    pub const fn reserved(self) -> Expect<'a> {
        Expect {
            reserved: true,
            ..self
        }
    }

    fn check(&self, header: &FrameHeader) -> Result<(), ProtocolError> {
        if !self.kinds.contains(&header.kind) {
            let expected: Vec<String> = self.kinds.iter().map(|k| k.to_string()).collect();
            return Err(ProtocolError::UnexpectedFrame {
                got: header.kind,
                expected: expected.join(" or "),
            });
        }
        if header.payload_len > self.max_payload {
            return Err(ProtocolError::FrameTooLarge {
                kind: header.kind,
                len: header.payload_len,
                limit: self.max_payload,
            });
        }
        Ok(())
    }
}

/// Reads one message of any kind. A stream that ends before any byte of a header gives
/// [`ProtocolError::Closed`]; one that ends inside a frame gives [`ProtocolError::Truncated`].
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    budget: &ByteBudget,
) -> Result<Message, ProtocolError> {
    read_expected(r, limits, budget, Expect::ANY).await
}

/// Reads one message that `expect` allows: a frame of another kind, or larger than it allows, is refused from
/// its header, before its payload is charged to the budget or read.
pub async fn read_expected<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    budget: &ByteBudget,
    expect: Expect<'_>,
) -> Result<Message, ProtocolError> {
    let header = read_header(r, limits, expect).await?;
    read_payload(r, header, limits, budget, expect).await
}

/// Reads and checks a frame's header: against `limits` and what `expect` allows. Nothing of the payload is
/// read; a reader may wait for a header as long as it likes, then give the payload [`read_payload`]'s time.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    expect: Expect<'_>,
) -> Result<FrameHeader, ProtocolError> {
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
    expect.check(&header)?;
    Ok(header)
}

/// Reads up to `len` bytes into `payload`, growing it by doubling as they arrive but never beyond `len`: a
/// frame of tens of megabytes costs its size, not the next power of two.
async fn read_exactly<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    payload: &mut Vec<u8>,
) -> std::io::Result<()> {
    while payload.len() < len {
        let remaining = len - payload.len();
        if payload.len() == payload.capacity() {
            let grow = payload.len().max(INITIAL_PAYLOAD_CAPACITY).min(remaining);
            payload.reserve_exact(grow);
        }
        let room = (payload.capacity() - payload.len()).min(remaining);
        let n = (&mut *r).take(room as u64).read_buf(payload).await?;
        if n == 0 {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads the payload of the frame whose header [`read_header`] read, after charging it to `budget`, within
/// `expect`'s time, and decodes it.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    header: FrameHeader,
    limits: &Limits,
    budget: &ByteBudget,
    expect: Expect<'_>,
) -> Result<Message, ProtocolError> {
    header.charge(budget)?;
    let len = header.payload_len;
    let first = if expect.reserved {
        len as usize
    } else {
        (len as usize).min(INITIAL_PAYLOAD_CAPACITY)
    };
    let mut payload = Vec::with_capacity(first);
    let reading = read_exactly(r, len as usize, &mut payload);
    match expect.payload_within {
        None => reading.await?,
        Some(d) => {
            tokio::time::timeout(d, reading)
                .await
                .map_err(|_| ProtocolError::FrameTimedOut {
                    kind: header.kind,
                    len,
                    secs: d.as_secs(),
                })??
        }
    };
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
    use crate::message::ErrorCode;

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

    /// The header of a frame declaring `len` payload bytes of `kind`, and no payload.
    fn header_only(kind: MessageKind, len: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        FrameHeader::write(kind, len, &mut h);
        h
    }

    #[tokio::test]
    async fn a_kind_the_state_does_not_allow_is_refused_from_its_header() {
        let limits = Limits::default();
        let budget = ByteBudget::new(1 << 20);
        // A FitResult of 100 MB where only a Hello may come: refused before its payload is charged or read
        // (reading it would end in Truncated: no payload follows).
        let h = header_only(MessageKind::FitResult, 100 << 20);
        let e = read_expected(
            &mut &h[..],
            &limits,
            &budget,
            Expect::only(&[MessageKind::Hello]),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, ProtocolError::UnexpectedFrame { got: MessageKind::FitResult, ref expected } if expected == "Hello"),
            "{e}"
        );
        assert_eq!(budget.remaining(), 1 << 20);
        // The same frame where any kind may come is charged and read (and found truncated).
        let e = read_message(&mut &h[..], &limits, &ByteBudget::new(200 << 20))
            .await
            .unwrap_err();
        assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_payload_larger_than_the_state_allows_is_refused_from_its_header() {
        let limits = Limits::default();
        let budget = ByteBudget::new(1 << 30);
        let h = header_only(MessageKind::FitResult, 5000);
        let expect = Expect::only(&[MessageKind::FitResult, MessageKind::Error]).at_most(4999);
        let e = read_expected(&mut &h[..], &limits, &budget, expect)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::FrameTooLarge {
                    len: 5000,
                    limit: 4999,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(budget.remaining(), 1 << 30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_payload_that_does_not_come_in_time_is_given_up() {
        let limits = Limits::default();
        let (mut a, mut b) = tokio::io::duplex(1024);
        // The header of a 10-byte Error, then nothing.
        a.write_all(&header_only(MessageKind::Error, 10))
            .await
            .unwrap();
        let expect = Expect::only(&[MessageKind::Error]).within(Duration::from_secs(3));
        let e = read_expected(&mut b, &limits, &ByteBudget::default(), expect)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::FrameTimedOut {
                    kind: MessageKind::Error,
                    len: 10,
                    secs: 3
                }
            ),
            "{e}"
        );
        drop(a);
    }
}
