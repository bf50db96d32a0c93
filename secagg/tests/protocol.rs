//! Whole secure sums among centres with real certificates (the federation PKI): the sum, dropouts at each
//! step, too few survivors, a server that lies about a dropout, and forged keys.

use std::collections::BTreeMap;

use fedslm_certs::{IssueOptions, Pki, Signer};
use fedslm_protocol::secure::{SecretKind, Secure, SecureBegin};
use fedslm_protocol::CenterId;
use fedslm_secagg::collector::Stage;
use fedslm_secagg::{fixed, Collector, Federation, Participant, SecureError};

struct Centre {
    signer: Signer,
    participant: Option<Participant>,
    input: Vec<f64>,
}

struct Net {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    centres: BTreeMap<CenterId, Centre>,
    collector: Collector,
}

fn id(s: &str) -> CenterId {
    CenterId::new(s).unwrap()
}

const RUN: &str = "run-1";

/// `n` centres, centre i's input `[i + 0.125, -2 i, counts...]`.
fn net(n: usize, threshold: u32) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "test", "localhost", &[]).unwrap();
    let names: Vec<CenterId> = (0..n).map(|i| id(&format!("centre-{i}"))).collect();
    let begin = SecureBegin {
        sum: [9; 16],
        participants: names.clone(),
        threshold,
        length: 4,
        scale_bits: fixed::SCALE_BITS,
        bound: fixed::BOUND,
        norm_bound: None,
    };
    let mut centres = BTreeMap::new();
    for (i, c) in names.iter().enumerate() {
        let files = pki
            .issue(
                c,
                &dir.path().join(c.as_str()),
                IssueOptions::days(30).unwrap(),
            )
            .unwrap();
        let signer = Signer::from_files(&files.cert, &files.key).unwrap();
        let x = i as f64;
        centres.insert(
            c.clone(),
            Centre {
                signer,
                participant: None,
                input: vec![x + 0.125, -2.0 * x, 10.0 + x, 1e-7 * x],
            },
        );
    }
    Net {
        ca: pki.ca_cert_path(),
        _dir: dir,
        centres,
        collector: Collector::new(begin).unwrap(),
    }
}

impl Net {
    fn federation(&self) -> Federation {
        Federation::from_file(&self.ca).unwrap()
    }

    /// Each centre answers `msg`; those in `silent` do not.
    fn answer(&mut self, out: Vec<(CenterId, Secure)>, silent: &[CenterId]) {
        for (c, msg) in out {
            if silent.contains(&c) {
                continue;
            }
            let centre = self.centres.get_mut(&c).unwrap();
            let p = centre.participant.as_mut().unwrap();
            let reply = match msg {
                Secure::Roster(r) => Some(p.roster(r).unwrap()),
                Secure::Delivered(d) => {
                    p.delivered(d).unwrap();
                    Some(p.mask(&centre.input, None).unwrap())
                }
                Secure::Survivors(s) => Some(p.survivors(s, &centre.signer).unwrap()),
                Secure::Unmask(s) => Some(p.unmask(s).unwrap()),
                other => panic!("unexpected {}", other.name()),
            };
            if let Some(reply) = reply {
                self.collector.take(&c, reply).unwrap();
            }
        }
    }

    /// Runs the sum; the centres in `drop_at[stage]` fall silent from that stage on.
    fn run(&mut self, drop_at: &[(Stage, &str)]) -> Result<Vec<f64>, SecureError> {
        let begin = self.collector.begin().clone();
        let fed = self.federation();
        let mut silent: Vec<CenterId> = Vec::new();
        let silence = |stage: Stage, silent: &mut Vec<CenterId>| {
            for (s, c) in drop_at {
                if *s == stage {
                    silent.push(id(c));
                }
            }
        };
        silence(Stage::Keys, &mut silent);
        let names: Vec<CenterId> = self.centres.keys().cloned().collect();
        for c in &names {
            let centre = self.centres.get_mut(c).unwrap();
            let (p, keys) =
                Participant::begin(RUN, c.clone(), begin.clone(), fed.clone(), &centre.signer)
                    .unwrap();
            centre.participant = Some(p);
            if !silent.contains(c) {
                self.collector.take(c, keys).unwrap();
            }
        }
        for stage in [
            Stage::Shares,
            Stage::Masked,
            Stage::Consistency,
            Stage::Reveal,
        ] {
            let out = self.collector.advance()?;
            silence(stage, &mut silent);
            self.answer(out, &silent);
        }
        assert!(self.collector.waiting().is_empty() || !silent.is_empty());
        self.collector.unmask()
    }

    fn sum_of(&self, who: &[usize]) -> Vec<f64> {
        let mut s = vec![0.0; 4];
        for (i, c) in self.centres.values().enumerate() {
            if who.contains(&i) {
                for (a, b) in s.iter_mut().zip(&c.input) {
                    *a += b;
                }
            }
        }
        s
    }
}

fn close(got: &[f64], want: &[f64], n: usize) {
    let bound = fixed::error_bound(fixed::SCALE_BITS, n);
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= bound, "got {got:?}, want {want:?}");
    }
}

#[test]
fn the_server_gets_the_sum_within_the_fixed_point_bound_and_counts_exactly() {
    let mut net = net(5, 3);
    let sum = net.run(&[]).unwrap();
    let want = net.sum_of(&[0, 1, 2, 3, 4]);
    close(&sum, &want, 5);
    assert_eq!(sum[2], 60.0, "integers are exact");
}

#[test]
fn a_centre_dropping_at_each_step_leaves_the_sum_of_those_whose_inputs_arrived() {
    // Silent from the stage named: before its keys, its shares, its input, its signature, its reveal.
    for (stage, inputs) in [
        (Stage::Keys, vec![0, 1, 2, 3]),
        (Stage::Shares, vec![0, 1, 2, 3]),
        (Stage::Masked, vec![0, 1, 2, 3]),
        (Stage::Consistency, vec![0, 1, 2, 3, 4]),
        (Stage::Reveal, vec![0, 1, 2, 3, 4]),
    ] {
        let mut net = net(5, 3);
        let sum = net.run(&[(stage, "centre-4")]).unwrap();
        close(&sum, &net.sum_of(&inputs), 5);
    }
    // Two drop after sending their shares: their pairwise masks are rebuilt from the others' shares.
    let mut net = net(5, 3);
    let sum = net
        .run(&[(Stage::Masked, "centre-1"), (Stage::Masked, "centre-3")])
        .unwrap();
    close(&sum, &net.sum_of(&[0, 2, 4]), 5);
}

#[test]
fn fewer_than_the_threshold_left_fails_the_sum_clearly() {
    let mut net = net(5, 3);
    let err = net
        .run(&[
            (Stage::Masked, "centre-1"),
            (Stage::Masked, "centre-3"),
            (Stage::Masked, "centre-0"),
        ])
        .unwrap_err();
    assert_eq!(
        err,
        SecureError::TooFew {
            stage: "masked inputs",
            have: 2,
            threshold: 3
        }
    );
    assert!(err.to_string().contains("fewer than the threshold of 3"));
}

#[test]
fn a_threshold_of_half_or_fewer_than_three_centres_is_refused() {
    let begin = |n: usize, t: u32| SecureBegin {
        sum: [0; 16],
        participants: (0..n).map(|i| id(&format!("c{i}"))).collect(),
        threshold: t,
        length: 1,
        scale_bits: fixed::SCALE_BITS,
        bound: fixed::BOUND,
        norm_bound: None,
    };
    assert!(Collector::new(begin(2, 2)).is_err(), "two centres");
    assert!(Collector::new(begin(4, 2)).is_err(), "half");
    assert!(Collector::new(begin(4, 3)).is_ok());
}

/// Five centres, threshold three, every one's keys, shares and masked input in: the survivors are next.
fn every_input_in() -> (Net, Vec<CenterId>) {
    let mut net = net(5, 3);
    let begin = net.collector.begin().clone();
    let fed = net.federation();
    let names: Vec<CenterId> = net.centres.keys().cloned().collect();
    for c in &names {
        let centre = net.centres.get_mut(c).unwrap();
        let (p, keys) =
            Participant::begin(RUN, c.clone(), begin.clone(), fed.clone(), &centre.signer).unwrap();
        centre.participant = Some(p);
        net.collector.take(c, keys).unwrap();
    }
    for _ in 0..2 {
        let out = net.collector.advance().unwrap();
        net.answer(out, &[]);
    }
    (net, names)
}

/// The server has centre-4's masked input, then says centre-4 dropped: the others reveal centre-4's mask key
/// and not its self-mask seed, and refuse a second request, so the server cannot unmask centre-4's input.
#[test]
fn a_server_claiming_a_dropout_after_the_input_cannot_obtain_that_input() {
    let (mut net, names) = every_input_in();
    let lie: Vec<CenterId> = names[..4].to_vec();
    let mut signatures = Vec::new();
    for c in &lie {
        let centre = net.centres.get_mut(c).unwrap();
        let p = centre.participant.as_mut().unwrap();
        let Secure::Consistency(sig) = p.survivors(lie.clone(), &centre.signer).unwrap() else {
            panic!()
        };
        signatures.push(fedslm_protocol::secure::SurvivorSignature {
            center: c.clone(),
            signature: sig,
        });
    }
    let victim = &names[4];
    for c in &lie {
        let p = net
            .centres
            .get_mut(c)
            .unwrap()
            .participant
            .as_mut()
            .unwrap();
        let Secure::Reveal(shares) = p.unmask(signatures.clone()).unwrap() else {
            panic!()
        };
        let of_victim: Vec<SecretKind> = shares
            .iter()
            .filter(|s| &s.owner == victim)
            .map(|s| s.kind)
            .collect();
        assert_eq!(of_victim, vec![SecretKind::MaskKey], "only the mask key");
        // Asked again (now saying centre-4 survived), the centre refuses.
        let again = p.unmask(signatures.clone()).unwrap_err();
        assert!(matches!(again, SecureError::Step { .. }), "{again}");
    }
}

#[test]
fn survivors_signed_over_a_different_list_fail_the_consistency_check() {
    let (mut net, names) = every_input_in();
    // The server tells centres 0-2 that 4 dropped and centres 3-4 that all survived.
    let short: Vec<CenterId> = names[..4].to_vec();
    let mut sigs = Vec::new();
    for (i, c) in names.iter().enumerate() {
        let list = if i < 3 { short.clone() } else { names.clone() };
        let centre = net.centres.get_mut(c).unwrap();
        let p = centre.participant.as_mut().unwrap();
        let Secure::Consistency(sig) = p.survivors(list, &centre.signer).unwrap() else {
            panic!()
        };
        sigs.push(fedslm_protocol::secure::SurvivorSignature {
            center: c.clone(),
            signature: sig,
        });
    }
    // Centre 3 signed the full list: the signatures of 0-2 (over the short one) do not check for it.
    let p = net
        .centres
        .get_mut(&names[3])
        .unwrap()
        .participant
        .as_mut()
        .unwrap();
    let err = p.unmask(sigs.clone()).unwrap_err();
    assert!(err.to_string().contains("not over the survivors"), "{err}");
}

#[test]
fn keys_not_signed_by_the_centres_certificate_key_are_refused() {
    let mut net = net(3, 2);
    let begin = net.collector.begin().clone();
    let fed = net.federation();
    let names: Vec<CenterId> = net.centres.keys().cloned().collect();
    let mut keys = Vec::new();
    for c in &names {
        let centre = net.centres.get_mut(c).unwrap();
        let (p, k) =
            Participant::begin(RUN, c.clone(), begin.clone(), fed.clone(), &centre.signer).unwrap();
        centre.participant = Some(p);
        let Secure::Keys(k) = k else { panic!() };
        keys.push(k);
    }
    // The server swaps in its own mask key for centre-1.
    let mut swapped = keys.clone();
    swapped[1].mask = fedslm_secagg::crypto::public_key(&[7; 32]);
    let p = net
        .centres
        .get_mut(&names[0])
        .unwrap()
        .participant
        .as_mut()
        .unwrap();
    let err = p.roster(swapped).unwrap_err();
    assert!(matches!(err, SecureError::Forged { .. }), "{err}");
    // Keys signed by centre-2's key but presented as centre-1's (with centre-2's certificate).
    let mut impostor = keys.clone();
    impostor[1].certificate = keys[2].certificate.clone();
    let err = p.roster(impostor).unwrap_err();
    assert!(
        err.to_string().contains("certificate is centre-2's"),
        "{err}"
    );
    // The genuine roster passes.
    assert!(p.roster(keys).is_ok());
}
