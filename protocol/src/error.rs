use crate::message::MessageKind;

/// Why a frame could not be written or read. Each variant says what was wrong and with which limit.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a fedslm frame: magic bytes {got:02x?}, expected {expected:02x?}", expected = crate::codec::MAGIC)]
    BadMagic { got: [u8; 4] },
    #[error("protocol version {got} is not supported; this side speaks version {supported}")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("reserved header flags are {0:#04x}, expected 0")]
    ReservedFlags(u8),
    #[error("{kind} frame declares {len} payload bytes; the limit for {kind} is {limit}")]
    FrameTooLarge {
        kind: MessageKind,
        len: u64,
        limit: u64,
    },
    #[error("{kind} frame of {needed} bytes exceeds what is left of this connection's byte budget ({remaining})")]
    BudgetExceeded {
        kind: MessageKind,
        needed: u64,
        remaining: u64,
    },
    #[error("{got} frame where only {expected} may come")]
    UnexpectedFrame { got: MessageKind, expected: String },
    #[error("{kind} frame of {len} bytes not received within {secs} s of its header")]
    FrameTimedOut {
        kind: MessageKind,
        len: u64,
        secs: u64,
    },
    #[error("connection closed in the middle of a frame: {got} of {expected} bytes received")]
    Truncated { expected: u64, got: u64 },
    #[error("connection closed")]
    Closed,
    #[error("malformed {kind} payload: {reason}")]
    Payload { kind: MessageKind, reason: String },
    #[error("{kind} payload has {extra} bytes after the message")]
    TrailingBytes { kind: MessageKind, extra: usize },
    #[error("cannot send {kind}: {reason}")]
    Encode { kind: MessageKind, reason: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
