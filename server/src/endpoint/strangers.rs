//! What a stranger may cost the server before it is known. An address QUIC has not validated gets a Retry
//! (stateless: a spoofed source never comes back); a validated one gets a handshake only within the limits of
//! handshakes in flight, in all and from its address (beyond them it is ignored, and its client's next
//! Initial tries again); a handshake has the Hello's time (`hello_timeout_secs`) to finish. Failed handshakes
//! are audited as one entry per interval, counted by reason, not one entry per attempt.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit::AuditEvent;

/// How often the failed handshakes counted so far go into the audit log as one entry.
pub(super) const TALLY_INTERVAL: Duration = Duration::from_secs(60);
/// Reasons kept apart in one interval's tally; the rest are counted as `other`.
const MAX_REASONS: usize = 16;
/// Source addresses counted apart in one interval's tally.
const MAX_ADDRESSES: usize = 4096;

/// Handshakes in flight the server allows, in all and from one source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    pub in_flight: usize,
    pub per_address: usize,
}

impl Default for HandshakeLimits {
    fn default() -> HandshakeLimits {
        HandshakeLimits {
            in_flight: 64,
            per_address: 16,
        }
    }
}

/// What becomes of an incoming connection attempt.
#[derive(Debug)]
pub(super) enum Screening {
    /// Its address is not validated: a Retry, which keeps no state.
    Retry,
    /// Too many handshakes in flight (in all, or from its address): no answer.
    Ignore(&'static str),
    /// A handshake, holding its place in the limits until the slot is dropped.
    Handshake(Slot),
}

/// The handshakes in flight, by source address.
#[derive(Debug, Default)]
pub(super) struct Gate {
    limits: HandshakeLimits,
    in_flight: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Gate {
    pub(super) fn new(limits: HandshakeLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            in_flight: Mutex::default(),
        })
    }

    /// Decides on an attempt from `ip`, whose address QUIC has `validated` (or cannot retry).
    pub(super) fn screen(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Screening {
        if !validated {
            return Screening::Retry;
        }
        let mut guard = super::lock(&self.in_flight);
        let (total, by_address) = &mut *guard;
        if *total >= self.limits.in_flight {
            return Screening::Ignore("too many handshakes in flight");
        }
        let here = by_address.entry(ip).or_default();
        if *here >= self.limits.per_address {
            return Screening::Ignore("too many handshakes in flight from one address");
        }
        *here += 1;
        *total += 1;
        Screening::Handshake(Slot {
            gate: self.clone(),
            ip,
        })
    }

    /// Handshakes in flight now, in all.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        super::lock(&self.in_flight).0
    }
}

/// A handshake's place in the limits; given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = super::lock(&self.gate.in_flight);
        let (total, by_address) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.ip);
            }
        }
    }
}

/// Failed and ignored handshakes since the last audit entry, by reason.
#[derive(Debug)]
pub(super) struct Tally {
    since: Instant,
    by_reason: BTreeMap<String, u64>,
    addresses: HashSet<IpAddr>,
    more_addresses: bool,
}

impl Tally {
    pub(super) fn new(now: Instant) -> Tally {
        Tally {
            since: now,
            by_reason: BTreeMap::new(),
            addresses: HashSet::new(),
            more_addresses: false,
        }
    }

    /// Counts one failure from `ip` for `reason` (a short class: a TLS alert's name, a timeout).
    pub(super) fn count(&mut self, reason: &str, ip: IpAddr) {
        let key = if self.by_reason.len() < MAX_REASONS || self.by_reason.contains_key(reason) {
            reason
        } else {
            "other"
        };
        *self.by_reason.entry(key.to_string()).or_default() += 1;
        if self.addresses.len() < MAX_ADDRESSES {
            self.addresses.insert(ip);
        } else if !self.addresses.contains(&ip) {
            self.more_addresses = true;
        }
    }

    /// The audit entry for what was counted since the last one (`None` if nothing was), and a fresh count
    /// from `now`.
    pub(super) fn take(&mut self, now: Instant) -> Option<AuditEvent> {
        let done = std::mem::replace(self, Tally::new(now));
        if done.by_reason.is_empty() {
            return None;
        }
        Some(AuditEvent::HandshakesFailed {
            seconds: now.saturating_duration_since(done.since).as_secs(),
            total: done.by_reason.values().sum(),
            addresses: done.addresses.len() as u64,
            more_addresses: done.more_addresses,
            by_reason: done.by_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn an_address_not_validated_gets_a_retry_and_takes_no_place() {
        let gate = Gate::new(HandshakeLimits {
            in_flight: 1,
            per_address: 1,
        });
        for _ in 0..1000 {
            assert!(matches!(gate.screen(ip(1), false), Screening::Retry));
        }
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn handshakes_beyond_the_limits_are_ignored_until_a_slot_is_given_back() {
        let gate = Gate::new(HandshakeLimits {
            in_flight: 3,
            per_address: 2,
        });
        let a1 = gate.screen(ip(1), true);
        let a2 = gate.screen(ip(1), true);
        assert!(matches!(a1, Screening::Handshake(_)));
        assert!(matches!(a2, Screening::Handshake(_)));
        assert!(matches!(
            gate.screen(ip(1), true),
            Screening::Ignore("too many handshakes in flight from one address")
        ));
        let b1 = gate.screen(ip(2), true);
        assert!(matches!(b1, Screening::Handshake(_)));
        assert!(matches!(
            gate.screen(ip(3), true),
            Screening::Ignore("too many handshakes in flight")
        ));
        drop(a1);
        assert_eq!(gate.in_flight(), 2);
        assert!(matches!(gate.screen(ip(1), true), Screening::Handshake(_)));
        drop((a2, b1));
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn failures_are_audited_once_per_interval_by_reason() {
        let t0 = Instant::now();
        let mut tally = Tally::new(t0);
        assert_eq!(tally.take(t0), None, "nothing counted, nothing audited");
        for i in 0..30_000u32 {
            tally.count("CertificateRequired", ip((i % 3) as u8));
        }
        tally.count("timed out", ip(9));
        let Some(AuditEvent::HandshakesFailed {
            seconds,
            total,
            addresses,
            by_reason,
            ..
        }) = tally.take(t0 + TALLY_INTERVAL)
        else {
            panic!()
        };
        assert_eq!((seconds, total, addresses), (60, 30_001, 4));
        assert_eq!(by_reason["CertificateRequired"], 30_000);
        assert_eq!(by_reason["timed out"], 1);
        assert_eq!(tally.take(t0 + 2 * TALLY_INTERVAL), None);
    }

    #[test]
    fn a_tally_keeps_a_bounded_number_of_reasons_and_addresses() {
        let t0 = Instant::now();
        let mut tally = Tally::new(t0);
        for i in 0..10_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            tally.count(&format!("reason {i}"), addr);
        }
        let Some(AuditEvent::HandshakesFailed {
            by_reason,
            addresses,
            more_addresses,
            ..
        }) = tally.take(t0)
        else {
            panic!()
        };
        assert_eq!(by_reason.len(), MAX_REASONS + 1);
        assert_eq!(by_reason["other"], 10_000 - MAX_REASONS as u64);
        assert_eq!(addresses, MAX_ADDRESSES as u64);
        assert!(more_addresses);
    }
}
