//! Frames over byte buffers: a 16-byte header, then a bincode 2 payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FSLM"
//!      4     2  protocol version, u16 little-endian
//!      6     1  message kind
//!      7     1  flags, reserved, 0
//!      8     8  payload length, u64 little-endian
//!     16     n  payload
//! ```
//!
//! Decoding never trusts a length: the header's against the kind's limit and the connection's budget, and
//! every length inside the payload against its limit and against the bytes that are actually there, before
//! anything is allocated. Tensor data is not copied: each tensor's bytes are a view into the frame.

use bincode::de::read::Reader;
use bincode::de::Decoder;
use bincode::enc::write::Writer;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};
use bytes::{Buf, Bytes, BytesMut};

use crate::center::CenterId;
use crate::error::ProtocolError;
use crate::limits::{ByteBudget, Limits};
use crate::message::*;
use crate::weights::{DType, Tensor, TensorRole, Weights};
use crate::PROTOCOL_VERSION;

mod secure;

use secure::check_secure;

pub const MAGIC: [u8; 4] = *b"FSLM";
pub const HEADER_LEN: usize = 16;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// A parsed, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: MessageKind,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header and checks it against `limits`: right magic and version, known kind, no flags, and a
    /// payload length within the kind's limit.
    pub fn parse(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<FrameHeader, ProtocolError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let kind = MessageKind::from_code(bytes[6]).ok_or(ProtocolError::UnknownKind(bytes[6]))?;
        if bytes[7] != 0 {
            return Err(ProtocolError::ReservedFlags(bytes[7]));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..16]);
        let payload_len = u64::from_le_bytes(len);
        let limit = limits.frame_limit(kind);
        if payload_len > limit {
            return Err(ProtocolError::FrameTooLarge {
                kind,
                len: payload_len,
                limit,
            });
        }
        Ok(FrameHeader { kind, payload_len })
    }

    /// Takes this frame's size from a connection's budget.
    pub fn charge(&self, budget: &ByteBudget) -> Result<(), ProtocolError> {
        let needed = self.payload_len + HEADER_LEN as u64;
        budget
            .take(needed)
            .map_err(|remaining| ProtocolError::BudgetExceeded {
                kind: self.kind,
                needed,
                remaining,
            })
    }

    pub(crate) fn write(kind: MessageKind, payload_len: u64, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6] = kind.code();
        out[7] = 0;
        out[8..16].copy_from_slice(&payload_len.to_le_bytes());
    }
}

/// Appends `msg` as one frame to `out`. Messages that break `limits` are refused here, so that a peer never
/// has to.
pub fn encode_into(msg: &Message, limits: &Limits, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let kind = msg.kind();
    let encode_err = |reason: String| ProtocolError::Encode { kind, reason };
    check_outgoing(msg, limits).map_err(encode_err)?;
    let start = out.len();
    out.reserve(HEADER_LEN + payload_size_hint(msg));
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = encode_payload(msg, VecWriter(out)) {
        out.truncate(start);
        return Err(encode_err(e.to_string()));
    }
    let payload_len = (out.len() - start - HEADER_LEN) as u64;
    if let Err(e) = within_limit(kind, payload_len, limits) {
        out.truncate(start);
        return Err(e);
    }
    FrameHeader::write(kind, payload_len, &mut out[start..start + HEADER_LEN]);
    Ok(())
}

/// The payload of `msg`, written to `w`.
fn encode_payload<W: Writer>(msg: &Message, w: W) -> Result<W, EncodeError> {
    let mut enc = bincode::enc::EncoderImpl::new(w, config());
    match msg {
        Message::Hello(m) => m.encode(&mut enc),
        Message::Welcome(m) => m.encode(&mut enc),
        Message::FitTask(m) => m.encode(&mut enc),
        Message::FitResult(m) => m.encode(&mut enc),
        Message::EvaluateTask(m) => m.encode(&mut enc),
        Message::EvalReport(m) => m.encode(&mut enc),
        Message::Finish(m) => m.encode(&mut enc),
        Message::Error(m) => m.encode(&mut enc),
        Message::PlacementTask(m) => m.encode(&mut enc),
        Message::PlacementReport(m) => m.encode(&mut enc),
        Message::StatusRequest(m) => m.encode(&mut enc),
        Message::StatusReport(m) => m.encode(&mut enc),
        Message::Secure(m) => m.encode(&mut enc),
    }?;
    Ok(enc.into_writer())
}

fn within_limit(kind: MessageKind, payload_len: u64, limits: &Limits) -> Result<(), ProtocolError> {
    let limit = limits.frame_limit(kind);
    if payload_len > limit {
        return Err(ProtocolError::Encode {
            kind,
            reason: format!("payload of {payload_len} bytes exceeds the limit of {limit}"),
        });
    }
    Ok(())
}

/// One frame as consecutive chunks: the header, then the payload, whose tensor data are the message's own
/// buffers ([`Bytes`] views), not copies. A 45 MB model is sent to every centre, and a centre's update back,
/// without being copied into a frame first.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Frame {
    /// The frame's length in bytes, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The frame in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

/// `msg` as one [`Frame`], its tensors' data shared, not copied; refused as [`encode`] refuses.
pub fn encode_frame(msg: &Message, limits: &Limits) -> Result<Frame, ProtocolError> {
    let kind = msg.kind();
    check_outgoing(msg, limits).map_err(|reason| ProtocolError::Encode { kind, reason })?;
    let weights = match msg {
        Message::FitTask(m) => Some(&m.weights),
        Message::FitResult(m) => Some(&m.weights),
        Message::EvaluateTask(m) => Some(&m.weights),
        _ => None,
    };
    let sources: Vec<&Bytes> = weights
        .map(|w| w.tensors().iter().map(|t| t.bytes()).collect())
        .unwrap_or_default();
    let writer = ChunkWriter {
        sources: &sources,
        chunks: Vec::new(),
        current: Vec::new(),
        len: 0,
    };
    let writer = encode_payload(msg, writer).map_err(|e| ProtocolError::Encode {
        kind,
        reason: e.to_string(),
    })?;
    let payload_len = writer.len as u64;
    within_limit(kind, payload_len, limits)?;
    let mut header = [0u8; HEADER_LEN];
    FrameHeader::write(kind, payload_len, &mut header);
    let mut chunks = Vec::with_capacity(writer.chunks.len() + 2);
    chunks.push(Bytes::copy_from_slice(&header));
    chunks.extend(writer.chunks);
    if !writer.current.is_empty() {
        chunks.push(Bytes::from(writer.current));
    }
    Ok(Frame {
        chunks,
        len: HEADER_LEN + writer.len,
    })
}

/// Writes no smaller than this are looked for among the message's tensor buffers, to be shared.
const SHARED_MIN: usize = 4096;

/// A writer that copies small writes into the current chunk and shares a write that lies inside one of
/// `sources` as a view into it.
struct ChunkWriter<'a> {
    sources: &'a [&'a Bytes],
    chunks: Vec<Bytes>,
    current: Vec<u8>,
    len: usize,
}

impl Writer for ChunkWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.len += bytes.len();
        if bytes.len() >= SHARED_MIN {
            let inside = |s: &&&Bytes| {
                let (start, at) = (s.as_ptr() as usize, bytes.as_ptr() as usize);
                at >= start && at + bytes.len() <= start + s.len()
            };
            if let Some(source) = self.sources.iter().find(inside) {
                if !self.current.is_empty() {
                    self.chunks
                        .push(Bytes::from(std::mem::take(&mut self.current)));
                }
                self.chunks.push(source.slice_ref(bytes));
                return Ok(());
            }
        }
        self.current.extend_from_slice(bytes);
        Ok(())
    }
}

/// `msg` as one frame.
pub fn encode(msg: &Message, limits: &Limits) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_into(msg, limits, &mut out)?;
    Ok(out)
}

fn payload_size_hint(msg: &Message) -> usize {
    let weights = match msg {
        Message::FitTask(m) => Some(&m.weights),
        Message::FitResult(m) => Some(&m.weights),
        Message::EvaluateTask(m) => Some(&m.weights),
        Message::Secure(crate::secure::Secure::Masked(m)) => return 16 + 16 * m.values.len(),
        _ => None,
    };
    weights.map_or(256, |w| {
        w.data_bytes()
            + w.tensors()
                .iter()
                .map(|t| t.name().len() + 32)
                .sum::<usize>()
            + 256
    })
}

/// The same checks the receiving side makes, so that an invalid message fails where it is made.
fn check_outgoing(msg: &Message, limits: &Limits) -> Result<(), String> {
    let text = |what: &str, s: &str| {
        if s.len() > limits.max_text_len as usize {
            Err(format!(
                "{what} is {} bytes; the limit is {}",
                s.len(),
                limits.max_text_len
            ))
        } else {
            Ok(())
        }
    };
    let weights = |w: &Weights| check_weights(w, limits);
    match msg {
        Message::Hello(m) => text("software_version", &m.software_version),
        Message::Welcome(m) => text("run_id", &m.run_id),
        Message::FitTask(m) => weights(&m.weights),
        Message::FitResult(m) => weights(&m.weights),
        Message::EvaluateTask(m) => weights(&m.weights),
        Message::EvalReport(m) => check_histogram(&m.histogram, limits),
        Message::Finish(m) => text("run_id", &m.run_id).and(text("reason", &m.reason)),
        Message::Error(m) => text("message", &m.message),
        Message::PlacementTask(m) => {
            for runs in [&m.a_runs, &m.b_runs] {
                if runs.is_empty() || runs.len() > MAX_PLACEMENT_RUNS {
                    return Err(format!(
                        "{} runs on one side; 1 to {MAX_PLACEMENT_RUNS}",
                        runs.len()
                    ));
                }
                for r in runs {
                    text("run_id", r)?;
                }
            }
            check_histogram(&m.pooled_a, limits).and(check_histogram(&m.pooled_b, limits))
        }
        Message::PlacementReport(_) | Message::StatusRequest(_) => Ok(()),
        Message::Secure(m) => check_secure(m, limits),
        Message::StatusReport(m) => {
            if m.rounds.len() > MAX_STATUS_ROUNDS {
                return Err(format!(
                    "{} rounds; the limit is {MAX_STATUS_ROUNDS}",
                    m.rounds.len()
                ));
            }
            text("run_id", &m.run_id)?;
            text("state", &m.state)?;
            m.rounds.iter().try_for_each(|r| text("reason", &r.reason))
        }
    }
}

fn check_weights(w: &Weights, limits: &Limits) -> Result<(), String> {
    if w.len() > limits.max_tensors as usize {
        return Err(format!(
            "{} tensors; the limit is {}",
            w.len(),
            limits.max_tensors
        ));
    }
    for t in w.tensors() {
        if t.name().len() > limits.max_name_len as usize {
            return Err(format!(
                "tensor name {:?} is {} bytes; the limit is {}",
                t.name(),
                t.name().len(),
                limits.max_name_len
            ));
        }
        if t.shape().len() > limits.max_rank as usize {
            return Err(format!(
                "tensor {:?} has rank {}; the limit is {}",
                t.name(),
                t.shape().len(),
                limits.max_rank
            ));
        }
    }
    if w.data_bytes() as u64 > limits.max_weights_bytes {
        return Err(format!(
            "{} bytes of tensor data; the limit is {}",
            w.data_bytes(),
            limits.max_weights_bytes
        ));
    }
    Ok(())
}

fn check_histogram(h: &ScoreHistogram, limits: &Limits) -> Result<(), String> {
    if h.positive.len() != h.negative.len() {
        return Err(format!(
            "histogram classes differ in bins: {} positive, {} negative",
            h.positive.len(),
            h.negative.len()
        ));
    }
    if h.positive.len() > limits.max_histogram_bins as usize {
        return Err(format!(
            "{} histogram bins; the limit is {}",
            h.positive.len(),
            limits.max_histogram_bins
        ));
    }
    Ok(())
}

/// Decodes one frame's payload, already bounded by its header.
pub fn decode_payload(
    header: &FrameHeader,
    payload: Bytes,
    limits: &Limits,
) -> Result<Message, ProtocolError> {
    let kind = header.kind;
    if payload.len() as u64 != header.payload_len {
        return Err(ProtocolError::Truncated {
            expected: header.payload_len,
            got: payload.len() as u64,
        });
    }
    let ctx = Ctx {
        payload: payload.clone(),
        limits: *limits,
    };
    let result = match kind {
        MessageKind::Hello => decode_as(&payload, ctx, Message::Hello),
        MessageKind::Welcome => decode_as(&payload, ctx, Message::Welcome),
        MessageKind::FitTask => decode_as(&payload, ctx, Message::FitTask),
        MessageKind::FitResult => decode_as(&payload, ctx, Message::FitResult),
        MessageKind::EvaluateTask => decode_as(&payload, ctx, Message::EvaluateTask),
        MessageKind::EvalReport => decode_as(&payload, ctx, Message::EvalReport),
        MessageKind::Finish => decode_as(&payload, ctx, Message::Finish),
        MessageKind::Error => decode_as(&payload, ctx, Message::Error),
        MessageKind::PlacementTask => decode_as(&payload, ctx, Message::PlacementTask),
        MessageKind::PlacementReport => decode_as(&payload, ctx, Message::PlacementReport),
        MessageKind::StatusRequest => decode_as(&payload, ctx, Message::StatusRequest),
        MessageKind::StatusReport => decode_as(&payload, ctx, Message::StatusReport),
        MessageKind::Secure => decode_as(&payload, ctx, Message::Secure),
    };
    let (msg, read) = result.map_err(|e| ProtocolError::Payload {
        kind,
        reason: describe(e),
    })?;
    if read != payload.len() {
        return Err(ProtocolError::TrailingBytes {
            kind,
            extra: payload.len() - read,
        });
    }
    Ok(msg)
}

fn decode_as<T: Decode<Ctx>>(
    payload: &[u8],
    ctx: Ctx,
    wrap: fn(T) -> Message,
) -> Result<(Message, usize), DecodeError> {
    bincode::decode_from_slice_with_context(payload, config(), ctx).map(|(m, n)| (wrap(m), n))
}

fn describe(e: DecodeError) -> String {
    match e {
        DecodeError::OtherString(s) => s,
        DecodeError::UnexpectedEnd { additional } => {
            format!("payload ends {additional} bytes too early")
        }
        other => other.to_string(),
    }
}

/// Decodes one whole frame from the front of `buf`, a complete frame or more.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Message, usize), ProtocolError> {
    let mut decoder = FrameDecoder::new(*limits, ByteBudget::new(u64::MAX));
    let mut bytes = BytesMut::from(buf);
    match decoder.decode(&mut bytes)? {
        Some(msg) => Ok((msg, buf.len() - bytes.len())),
        None => Err(ProtocolError::Truncated {
            expected: decoder
                .pending
                .map_or(HEADER_LEN as u64, |h| h.payload_len + HEADER_LEN as u64),
            got: buf.len() as u64,
        }),
    }
}

/// Incremental decoder for a byte stream: feed it what has arrived, take out whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    budget: ByteBudget,
    pending: Option<FrameHeader>,
}

impl FrameDecoder {
    pub fn new(limits: Limits, budget: ByteBudget) -> FrameDecoder {
        FrameDecoder {
            limits,
            budget,
            pending: None,
        }
    }

    /// The next message at the front of `buf`, removing its bytes; `None` until a whole frame is there.
    /// After an error the stream is unusable: frame boundaries are lost.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&buf[..HEADER_LEN]);
                let h = FrameHeader::parse(&raw, &self.limits)?;
                h.charge(&self.budget)?;
                buf.advance(HEADER_LEN);
                self.pending = Some(h);
                h
            }
        };
        // The length is within the kind's limit, so it fits in usize on every supported target.
        let len = header.payload_len as usize;
        if buf.len() < len {
            return Ok(None);
        }
        self.pending = None;
        let payload = buf.split_to(len).freeze();
        decode_payload(&header, payload, &self.limits).map(Some)
    }
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// What decoding needs besides the bytes: the frame (tensor data are views into it) and the limits.
struct Ctx {
    payload: Bytes,
    limits: Limits,
}

fn fail(msg: String) -> DecodeError {
    DecodeError::OtherString(msg)
}

fn length<D: Decoder>(d: &mut D, what: &str, max: u64) -> Result<usize, DecodeError> {
    let len = u64::decode(d)?;
    if len > max {
        return Err(fail(format!("{what} claims {len}; the limit is {max}")));
    }
    usize::try_from(len).map_err(|_| fail(format!("{what} claims {len}")))
}

/// Fails unless `n` more bytes are really there: a claimed count is never believed before the bytes are.
fn ensure_available<D: Decoder>(d: &mut D, what: &str, n: usize) -> Result<(), DecodeError> {
    if d.reader().peek_read(n).is_none() {
        return Err(fail(format!(
            "{what} claims {n} bytes, more than the payload holds"
        )));
    }
    Ok(())
}

fn text<D: Decoder>(d: &mut D, what: &str, max: u32) -> Result<String, DecodeError> {
    let len = length(d, what, u64::from(max))?;
    ensure_available(d, what, len)?;
    let mut buf = vec![0u8; len];
    d.reader().read(&mut buf)?;
    String::from_utf8(buf).map_err(|_| fail(format!("{what} is not UTF-8")))
}

/// A list whose elements each take at least one byte, so the count is checked against the bytes left.
fn list<D: Decoder, T>(
    d: &mut D,
    what: &str,
    max: u64,
    mut item: impl FnMut(&mut D) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let len = length(d, what, max)?;
    ensure_available(d, what, len)?;
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(item(d)?);
    }
    Ok(out)
}

/// The next `len` bytes as a view into the frame, without copying.
fn frame_bytes<D: Decoder<Context = Ctx>>(
    d: &mut D,
    what: &str,
    len: usize,
) -> Result<Bytes, DecodeError> {
    let start = match d.reader().peek_read(len) {
        Some(s) => s.as_ptr() as usize,
        None => {
            return Err(fail(format!(
                "{what} claims {len} bytes, more than the payload holds"
            )))
        }
    };
    let payload = &d.context().payload;
    let offset = start
        .checked_sub(payload.as_ptr() as usize)
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= payload.len()))
        .ok_or_else(|| fail("decoder is not reading its own frame".to_string()))?;
    let view = payload.slice(offset..offset + len);
    d.reader().consume(len);
    Ok(view)
}

impl Encode for CenterId {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.as_str().encode(e)
    }
}

fn center<D: Decoder>(d: &mut D) -> Result<CenterId, DecodeError> {
    let s = text(d, "centre id", crate::center::MAX_CENTER_ID_LEN as u32)?;
    CenterId::new(s).map_err(|e| fail(e.to_string()))
}

impl Encode for Tensor {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.name().encode(e)?;
        self.shape().encode(e)?;
        self.dtype().code().encode(e)?;
        self.role().code().encode(e)?;
        self.bytes().as_ref().encode(e)
    }
}

impl Encode for Weights {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.tensors().encode(e)
    }
}

fn tensor<D: Decoder<Context = Ctx>>(d: &mut D, budget: &mut u64) -> Result<Tensor, DecodeError> {
    let limits = d.context().limits;
    let name = text(d, "tensor name", limits.max_name_len)?;
    let shape = list(d, "tensor rank", u64::from(limits.max_rank), |d| {
        let dim = u64::decode(d)?;
        usize::try_from(dim).map_err(|_| fail(format!("dimension {dim} does not fit this machine")))
    })?;
    let dtype_code = u8::decode(d)?;
    let dtype = DType::from_code(dtype_code)
        .ok_or_else(|| fail(format!("tensor {name:?}: unknown dtype code {dtype_code}")))?;
    let role_code = u8::decode(d)?;
    let role = TensorRole::from_code(role_code)
        .ok_or_else(|| fail(format!("tensor {name:?}: unknown role code {role_code}")))?;
    let what = format!("tensor {name:?} data");
    let len = length(d, &what, *budget)?;
    *budget -= len as u64;
    let data = frame_bytes(d, &what, len)?;
    Tensor::from_raw(name, shape, dtype, role, data).map_err(|e| fail(e.to_string()))
}

fn weights<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Weights, DecodeError> {
    let limits = d.context().limits;
    let mut budget = limits.max_weights_bytes;
    let tensors = list(d, "tensor count", u64::from(limits.max_tensors), |d| {
        tensor(d, &mut budget)
    })?;
    Weights::from_tensors(tensors).map_err(|e| fail(e.to_string()))
}

fn counts<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Vec<u64>, DecodeError> {
    let max = d.context().limits.max_histogram_bins;
    list(d, "histogram bins", u64::from(max), u64::decode)
}

/// A histogram of scores: its positives' and negatives' counts, checked against the limits.
fn histogram<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<ScoreHistogram, DecodeError> {
    let h = ScoreHistogram {
        positive: counts(d)?,
        negative: counts(d)?,
    };
    check_histogram(&h, &d.context().limits).map_err(fail)?;
    Ok(h)
}

impl Decode<Ctx> for Hello {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        Ok(Hello {
            protocol_version: Decode::decode(d)?,
            software_version: text(d, "software_version", max_text)?,
            center: center(d)?,
            settings_hash: Decode::decode(d)?,
            policy_hash: Decode::decode(d)?,
            requires_dp: Decode::decode(d)?,
            counts: Decode::decode(d)?,
        })
    }
}

impl Decode<Ctx> for Welcome {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        Ok(Welcome {
            run_id: text(d, "run_id", max_text)?,
            center: center(d)?,
            role: Decode::decode(d)?,
            rounds: Decode::decode(d)?,
        })
    }
}

fn fold<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Option<Fold>, DecodeError> {
    let fold: Option<Fold> = Decode::decode(d)?;
    match fold {
        Some(f) if Fold::new(f.index, f.count, f.seed).is_none() => Err(fail(format!(
            "fold {} of {}: folds are 2 to {MAX_FOLDS}, the index below their count",
            f.index, f.count
        ))),
        other => Ok(other),
    }
}

fn dp<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Option<DpSgd>, DecodeError> {
    let dp: Option<DpSgd> = Decode::decode(d)?;
    if let Some(p) = &dp {
        p.check()
            .map_err(|e| fail(format!("differential privacy: {e}")))?;
    }
    Ok(dp)
}

impl Decode<Ctx> for FitTask {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(FitTask {
            round: Decode::decode(d)?,
            model: Decode::decode(d)?,
            weights: weights(d)?,
            local_epochs: Decode::decode(d)?,
            learning_rate: Decode::decode(d)?,
            batch_size: Decode::decode(d)?,
            fold: fold(d)?,
            seed: Decode::decode(d)?,
            objective: Decode::decode(d)?,
            keep_batch_norm_local: Decode::decode(d)?,
            dp: dp(d)?,
        })
    }
}

impl Decode<Ctx> for FitResult {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(FitResult {
            round: Decode::decode(d)?,
            weights: weights(d)?,
            examples: Decode::decode(d)?,
            train_loss: Decode::decode(d)?,
        })
    }
}

impl Decode<Ctx> for EvaluateTask {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(EvaluateTask {
            round: Decode::decode(d)?,
            model: Decode::decode(d)?,
            weights: weights(d)?,
            fold: fold(d)?,
            histogram_bins: Decode::decode(d)?,
            histogram_noise: match Option::<f64>::decode(d)? {
                Some(s) if !(s > 0.0 && s <= MAX_NOISE) => {
                    return Err(fail(format!("histogram noise {s:?} (0 to {MAX_NOISE:e})")))
                }
                other => other,
            },
            adapt_batch_norm: Decode::decode(d)?,
        })
    }
}

impl Decode<Ctx> for EvalReport {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let round = Decode::decode(d)?;
        let examples = Decode::decode(d)?;
        let positives = Decode::decode(d)?;
        let loss = Decode::decode(d)?;
        let histogram = histogram(d)?;
        Ok(EvalReport {
            round,
            examples,
            positives,
            loss,
            histogram,
        })
    }
}

impl Decode<Ctx> for PlacementTask {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        let runs = |d: &mut D, what: &str| -> Result<Vec<String>, DecodeError> {
            let runs = list(d, what, MAX_PLACEMENT_RUNS as u64, |d| {
                text(d, "run_id", max_text)
            })?;
            if runs.is_empty() {
                return Err(fail(format!("{what}: none")));
            }
            Ok(runs)
        };
        let a_runs = runs(d, "a_runs")?;
        let b_runs = runs(d, "b_runs")?;
        let pooled_a = histogram(d)?;
        let pooled_b = histogram(d)?;
        Ok(PlacementTask {
            a_runs,
            b_runs,
            pooled_a,
            pooled_b,
        })
    }
}

impl Decode<Ctx> for Finish {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        Ok(Finish {
            run_id: text(d, "run_id", max_text)?,
            rounds_completed: Decode::decode(d)?,
            reason: text(d, "reason", max_text)?,
        })
    }
}

impl Decode<Ctx> for StatusRequest {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(StatusRequest {
            protocol_version: Decode::decode(d)?,
            center: center(d)?,
        })
    }
}

impl Decode<Ctx> for StatusReport {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        Ok(StatusReport {
            run_id: text(d, "run_id", max_text)?,
            state: text(d, "state", max_text)?,
            rounds_planned: Decode::decode(d)?,
            rounds_committed: Decode::decode(d)?,
            rounds: list(d, "rounds", MAX_STATUS_ROUNDS as u64, |d| {
                Ok(RoundPart {
                    round: Decode::decode(d)?,
                    outcome: Decode::decode(d)?,
                    examples: Decode::decode(d)?,
                    train_loss: Decode::decode(d)?,
                    reason: text(d, "reason", max_text)?,
                })
            })?,
            evaluation: Decode::decode(d)?,
        })
    }
}

impl Decode<Ctx> for ErrorMessage {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let max_text = d.context().limits.max_text_len;
        Ok(ErrorMessage {
            code: Decode::decode(d)?,
            message: text(d, "message", max_text)?,
        })
    }
}
