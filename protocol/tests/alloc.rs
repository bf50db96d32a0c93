//! A peer's claimed lengths cost nothing until the bytes arrive: measured with a counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fedslm_protocol::codec::{self, FrameDecoder};
use fedslm_protocol::io::{self, read_message};
use fedslm_protocol::*;

struct Counting;

thread_local! {
    // Const-initialised and without a destructor, so the allocator can touch it without recursion.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = TOTAL.try_with(|t| t.set(t.get() + size));
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (largest single allocation, total bytes allocated) on this thread while `f` runs.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|l| l.set(0));
    TOTAL.with(|t| t.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()), TOTAL.with(|t| t.get()))
}

fn header(kind: MessageKind, len: u64) -> Vec<u8> {
    let mut f = b"FSLM".to_vec();
    f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    f.push(kind.code());
    f.push(0);
    f.extend_from_slice(&len.to_le_bytes());
    f
}

const MIB: usize = 1024 * 1024;

#[test]
fn the_counter_sees_a_large_allocation() {
    // Positive control: without it, the assertions below could pass with a counter that counts nothing.
    let (v, largest, _) = measure(|| vec![1u8; 300 * MIB]);
    assert_eq!(v.len(), 300 * MIB);
    assert!(largest >= 300 * MIB);
}

#[test]
fn a_huge_claimed_length_allocates_nothing_near_it() {
    let limits = Limits::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // Over the kind's limit: refused from the header alone.
    let h = header(MessageKind::FitResult, u64::MAX);
    let (r, largest, total) =
        measure(|| rt.block_on(read_message(&mut &h[..], &limits, &ByteBudget::default())));
    assert!(
        matches!(r, Err(ProtocolError::FrameTooLarge { .. })),
        "{r:?}"
    );
    assert!(total < 64 * 1024, "largest {largest}, total {total}");

    // Within the limit (500 MB of weights may legitimately come), but the peer sends nothing after it.
    let h = header(MessageKind::FitResult, 500 * MIB as u64);
    let (r, largest, _) =
        measure(|| rt.block_on(read_message(&mut &h[..], &limits, &ByteBudget::default())));
    assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "{r:?}");
    assert!(largest < MIB, "largest allocation {largest} bytes");

    // A reader that reserved memory for the frame (it holds a permit) allocates its length at once, and a
    // frame cut short is still refused.
    let reserved = io::Expect::ANY.reserved();
    let claimed = header(MessageKind::FitResult, 4 * MIB as u64);
    let (r, largest, _) = measure(|| {
        rt.block_on(async {
            let mut r = &claimed[..];
            let header = io::read_header(&mut r, &limits, reserved).await?;
            io::read_payload(&mut r, header, &limits, &ByteBudget::default(), reserved).await
        })
    });
    assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "{r:?}");
    assert!(largest >= 4 * MIB, "largest allocation {largest} bytes");

    // The same through the buffer decoder.
    let (r, largest, _) = measure(|| {
        let mut dec = FrameDecoder::new(limits, ByteBudget::default());
        let mut buf = bytes::BytesMut::from(&h[..]);
        dec.decode(&mut buf)
    });
    assert!(matches!(r, Ok(None)), "{r:?}");
    assert!(largest < MIB, "largest allocation {largest} bytes");
}

#[test]
fn huge_lengths_inside_a_small_payload_allocate_nothing_near_them() {
    let limits = Limits::default();
    let enc = |v: &dyn Fn(&mut Vec<u8>)| {
        let mut p = Vec::new();
        v(&mut p);
        p
    };
    let cfg = bincode::config::standard();
    // One tensor whose data claims 500 MB (within the weights limit) in a 40-byte payload.
    let payload = enc(&|p| {
        p.extend(
            bincode::encode_to_vec(
                (
                    1u32,
                    1u64,
                    "w".to_string(),
                    vec![125 * MIB as u64],
                    0u8,
                    0u8,
                ),
                cfg,
            )
            .unwrap(),
        );
        p.extend(bincode::encode_to_vec(500 * MIB as u64, cfg).unwrap());
    });
    let mut frame = header(MessageKind::FitResult, payload.len() as u64);
    frame.extend(&payload);
    let (r, largest, _) = measure(|| codec::decode(&frame, &limits));
    assert!(r.is_err());
    assert!(largest < 64 * 1024, "largest allocation {largest} bytes");

    // A tensor list claiming 4096 entries, a histogram claiming a million bins.
    for (kind, payload) in [
        (
            MessageKind::FitResult,
            bincode::encode_to_vec((1u32, 4096u64), cfg).unwrap(),
        ),
        (
            MessageKind::EvalReport,
            bincode::encode_to_vec((1u32, 1u64, 1u64, 0f64, 1_000_000u64), cfg).unwrap(),
        ),
    ] {
        let mut frame = header(kind, payload.len() as u64);
        frame.extend(&payload);
        let (r, largest, _) = measure(|| codec::decode(&frame, &limits));
        assert!(r.is_err(), "{kind}");
        assert!(
            largest < 64 * 1024,
            "{kind}: largest allocation {largest} bytes"
        );
    }
}

#[test]
fn received_tensor_data_is_not_copied_out_of_the_frame() {
    let values = vec![0.5f32; 4 * MIB];
    let w = Weights::from_tensors(vec![Tensor::from_f32(
        "w",
        vec![4 * MIB],
        TensorRole::Parameter,
        &values,
    )
    .unwrap()])
    .unwrap();
    let msg = Message::FitResult(FitResult {
        round: 1,
        weights: w,
        examples: 1,
        train_loss: 0.0,
    });
    let limits = Limits::default();
    let frame = codec::encode(&msg, &limits).unwrap();
    let (r, _, total) = measure(|| codec::decode(&frame, &limits));
    assert_eq!(r.unwrap().0, msg);
    // One copy of the frame into the decoder's buffer; none for the tensor itself.
    assert!(
        total < frame.len() + MIB,
        "allocated {total} bytes for a {} byte frame",
        frame.len()
    );
}
