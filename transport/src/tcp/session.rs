//! The session stream's bytes: [`OPENED`] when a side opens it, [`KEEPALIVE`] every few seconds (so that a
//! proxy or a NAT on the way does not drop an idle tunnel, and the peer knows the path is alive), then at its
//! close one close record, `0x02, code (u32, big-endian), reason length (u16, big-endian, at most 1024),
//! reason (UTF-8)`.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The first byte on each side's session stream (it makes yamux send the stream's opening at once).
pub(super) const OPENED: u8 = 0x01;
const CLOSE: u8 = 0x02;
/// A byte that says only "still here".
pub(super) const KEEPALIVE: u8 = 0x03;
/// The longest reason sent or read; QUIC's close reasons are short too.
const MAX_REASON: usize = 1024;

/// A connection's close code and reason, as QUIC's CONNECTION_CLOSE carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseRecord {
    pub(crate) code: u32,
    pub(crate) reason: String,
}

impl CloseRecord {
    /// A record of `code` and `reason`, the reason cut to [`MAX_REASON`] bytes at a character boundary.
    pub(crate) fn new(code: u32, reason: &[u8]) -> CloseRecord {
        let mut reason = String::from_utf8_lossy(reason).into_owned();
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        CloseRecord { code, reason }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(7 + self.reason.len());
        out.push(CLOSE);
        out.extend_from_slice(&self.code.to_be_bytes());
        // At most MAX_REASON bytes (`new`), so it fits a u16.
        out.extend_from_slice(&(self.reason.len() as u16).to_be_bytes());
        out.extend_from_slice(self.reason.as_bytes());
        out
    }
}

/// Reads the peer's session stream to its close record; `None` if it ends first or breaks the format.
pub(super) async fn read_close<R: AsyncRead + Unpin>(mut r: R) -> Option<CloseRecord> {
    let mut byte = [0u8; 1];
    r.read_exact(&mut byte).await.ok()?;
    if byte[0] != OPENED {
        return None;
    }
    loop {
        r.read_exact(&mut byte).await.ok()?;
        match byte[0] {
            KEEPALIVE => continue,
            CLOSE => break,
            _ => return None,
        }
    }
    let mut head = [0u8; 6];
    r.read_exact(&mut head).await.ok()?;
    let code = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let len = usize::from(u16::from_be_bytes([head[4], head[5]]));
    if len > MAX_REASON {
        return None;
    }
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason).await.ok()?;
    Some(CloseRecord {
        code,
        reason: String::from_utf8_lossy(&reason).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(records: &[&[u8]]) -> std::io::Cursor<Vec<u8>> {
        let mut bytes = vec![OPENED];
        for r in records {
            bytes.extend_from_slice(r);
        }
        std::io::Cursor::new(bytes)
    }

    #[tokio::test]
    async fn a_close_record_reads_back_as_written_after_keepalives() {
        let record = CloseRecord::new(3, b"a newer connection took over");
        let read = read_close(stream(&[&record.encode()])).await;
        assert_eq!(read, Some(record.clone()));
        let read = read_close(stream(&[&[KEEPALIVE, KEEPALIVE], &record.encode()])).await;
        assert_eq!(read, Some(record));
        assert_eq!(
            read_close(stream(&[&[0x07]])).await,
            None,
            "an unknown byte"
        );
    }

    #[tokio::test]
    async fn a_long_reason_is_cut_at_a_character_and_an_oversized_length_is_refused() {
        let long = "é".repeat(600);
        let record = CloseRecord::new(1, long.as_bytes());
        assert_eq!(record.reason.len(), 1024);
        assert_eq!(read_close(stream(&[&record.encode()])).await, Some(record));
        let mut forged = vec![CLOSE, 0, 0, 0, 1, 0xff, 0xff];
        forged.extend(std::iter::repeat_n(b'x', 2000));
        assert_eq!(read_close(stream(&[&forged])).await, None);
        assert_eq!(read_close(stream(&[])).await, None, "ended before a record");
    }
}
