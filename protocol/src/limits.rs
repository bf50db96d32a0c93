//! Every size a peer can claim has a limit here, checked before anything is allocated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::message::MessageKind;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Size limits for frames and their contents. One value serves both directions of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tensor data in one message, all tensors together.
    pub max_weights_bytes: u64,
    /// Tensors in one message.
    pub max_tensors: u32,
    /// Bytes in a tensor name.
    pub max_name_len: u32,
    /// Dimensions of one tensor.
    pub max_rank: u32,
    /// Bytes in a free-text field (error messages, versions, run ids).
    pub max_text_len: u32,
    /// Bins in one class of a score histogram.
    pub max_histogram_bins: u32,
    /// Payload of a Hello, Welcome, Finish or Error frame.
    pub max_control_frame: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_weights_bytes: 512 * MIB,
            max_tensors: 4096,
            max_name_len: 256,
            max_rank: 8,
            max_text_len: 4096,
            max_histogram_bins: 1_000_000,
            max_control_frame: 64 * KIB,
        }
    }
}

impl Limits {
    /// Largest payload a frame of `kind` may declare.
    pub fn frame_limit(&self, kind: MessageKind) -> u64 {
        // Per tensor besides its data: name, shape and a few bytes of codes, each length a varint of at most 9.
        let per_tensor = u64::from(self.max_name_len) + 9 * (u64::from(self.max_rank) + 3) + 2;
        let weights_frame = self
            .max_weights_bytes
            .saturating_add(u64::from(self.max_tensors).saturating_mul(per_tensor))
            .saturating_add(u64::from(self.max_text_len) + 4 * KIB);
        match kind {
            MessageKind::Hello
            | MessageKind::Welcome
            | MessageKind::Finish
            | MessageKind::Error => self.max_control_frame,
            MessageKind::FitTask | MessageKind::FitResult | MessageKind::EvaluateTask => {
                weights_frame
            }
            // Two classes of bins, a varint of at most 9 bytes each.
            MessageKind::EvalReport => 2 * 9 * u64::from(self.max_histogram_bins) + 4 * KIB,
            // Two histograms, and the runs named on each side.
            MessageKind::PlacementTask => {
                4 * 9 * u64::from(self.max_histogram_bins)
                    + 2 * crate::MAX_PLACEMENT_RUNS as u64 * (u64::from(self.max_text_len) + 9)
                    + 4 * KIB
            }
            MessageKind::PlacementReport | MessageKind::StatusRequest => self.max_control_frame,
            // A masked input: 16 bytes per element, as many elements as a quarter of the tensor data's bytes
            // (f32 and wider tensors) and the few counts beside them; or a roster of certificates.
            MessageKind::Secure => (4 * self.max_weights_bytes + 16 * MIB + 4 * KIB).max(
                crate::secure::MAX_PARTICIPANTS as u64
                    * (crate::secure::MAX_CERTIFICATE_LEN as u64 + 512),
            ),
            // Run id, state, the rounds with their reasons, the evaluation.
            MessageKind::StatusReport => {
                (crate::MAX_STATUS_ROUNDS as u64 + 2) * (u64::from(self.max_text_len) + 64)
                    + 4 * KIB
            }
        }
    }
}

/// Bytes a connection may still receive, shared by all of its streams.
///
/// A peer that passes every per-frame limit can still send without end; the budget bounds a connection's whole
/// life. Cloning shares the same budget.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    remaining: Arc<AtomicU64>,
}

/// Default budget of one connection: 100 rounds of a 45 MB model in and out, with ample room to spare.
pub const DEFAULT_CONNECTION_BUDGET: u64 = 64 * GIB;

impl ByteBudget {
    pub fn new(bytes: u64) -> ByteBudget {
        ByteBudget {
            remaining: Arc::new(AtomicU64::new(bytes)),
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes from the budget, or none if fewer remain.
    pub fn take(&self, n: u64) -> Result<(), u64> {
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
    }
}

impl Default for ByteBudget {
    fn default() -> ByteBudget {
        ByteBudget::new(DEFAULT_CONNECTION_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_small_and_weight_frames_fit_the_weights() {
        let l = Limits::default();
        assert_eq!(l.frame_limit(MessageKind::Hello), 64 * KIB);
        let fit = l.frame_limit(MessageKind::FitResult);
        assert!(fit > 512 * MIB && fit < 520 * MIB, "{fit}");
    }

    #[test]
    fn budget_is_shared_and_never_goes_below_zero() {
        let b = ByteBudget::new(100);
        let c = b.clone();
        assert!(b.take(60).is_ok());
        assert_eq!(c.take(41), Err(40));
        assert!(c.take(40).is_ok());
        assert_eq!(b.remaining(), 0);
    }
}
