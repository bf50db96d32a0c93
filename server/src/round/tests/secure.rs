//! Secure aggregation through the round machine, with a fake clock and real participants (certificates from a
//! federation PKI): the round's model is the plain FedAvg of the centres whose masked inputs arrived, a centre
//! may drop at any step while `t` remain, and with fewer the round fails saying why.

use fedslm_certs::{IssueOptions, Pki, Signer};
use fedslm_protocol::landmarks::{landmark_weights, landmarks_of};
use fedslm_protocol::secure::{Secure, SecureBegin};
use fedslm_protocol::FitTask;
use fedslm_secagg::collector::Stage;
use fedslm_secagg::layout::FitLayout;
use fedslm_secagg::{Federation, Participant};

use super::*;

const CENTRES: [&str; 4] = ["a", "b", "c", "d"];

struct Site {
    signer: Signer,
    participant: Option<Participant>,
    task: TaskId,
}

struct Harness {
    _dir: tempfile::TempDir,
    federation: Federation,
    sites: BTreeMap<CenterId, Site>,
    m: Coordinator,
    now: Instant,
    /// Each centre's update: its weights and examples.
    updates: BTreeMap<CenterId, (Weights, u64)>,
}

fn update(i: usize) -> (Weights, u64) {
    let x = i as f32;
    (
        model(&[x + 0.25, -x, 0.5 * x, 1.0 - x], 1.0 + x),
        10 + 5 * i as u64,
    )
}

fn harness(threshold: usize, retries: u32) -> Harness {
    harness_of(
        settings(threshold),
        model(&[0.0; 4], 1.0),
        update,
        threshold,
        retries,
    )
}

/// A secure run of one round from `initial` with `settings`, in which centre `i` answers `update(i)`.
fn harness_of(
    mut s: RoundSettings,
    initial: Weights,
    update: fn(usize) -> (Weights, u64),
    threshold: usize,
    retries: u32,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "test", "localhost", &[]).unwrap();
    let roles: BTreeMap<CenterId, Role> = CENTRES.iter().map(|c| (id(c), Role::Train)).collect();
    s.secure_threshold = Some(threshold);
    s.retries = retries;
    s.rounds = 1;
    let mut m = Coordinator::new(s, roles, initial, &[]).unwrap();
    let now = Instant::now();
    let mut sites = BTreeMap::new();
    let mut updates = BTreeMap::new();
    for (i, c) in CENTRES.iter().enumerate() {
        let files = pki
            .issue(&id(c), &dir.path().join(c), IssueOptions::days(30).unwrap())
            .unwrap();
        sites.insert(
            id(c),
            Site {
                signer: Signer::from_files(&files.cert, &files.key).unwrap(),
                participant: None,
                task: 0,
            },
        );
        updates.insert(id(c), update(i));
        m.handle(
            Input::Connected {
                center: id(c),
                connection: i as u64,
                declared: DECLARED,
            },
            now,
        );
    }
    Harness {
        federation: Federation::from_file(&pki.ca_cert_path()).unwrap(),
        _dir: dir,
        sites,
        m,
        now,
        updates,
    }
}

impl Harness {
    /// Runs the round: each site answers each step, except that `drop` leaves (its connection closes)
    /// when the step named comes to it, and `silent` says nothing from then on (the clock then moves to each
    /// step's deadline). Returns every action.
    fn run(&mut self, drop: &[(&str, Stage)], silent: &[(&str, Stage)]) -> Vec<Action> {
        let mut all = Vec::new();
        let mut pending = actions(&mut self.m, self.now);
        let mut task: Option<FitTask> = None;
        let mut begin: Option<SecureBegin> = None;
        let mut quiet: Vec<CenterId> = Vec::new();
        for _ in 0..20 {
            if pending.is_empty() {
                if self.m.is_finished() {
                    break;
                }
                // Nobody has anything to say: the step's deadline passes.
                self.now += MINUTE;
                self.m.handle_timeout(self.now);
                pending = actions(&mut self.m, self.now);
                continue;
            }
            let mut inputs = Vec::new();
            for a in &pending {
                match a {
                    Action::BeginSecure { begin: b, .. } => begin = Some((**b).clone()),
                    Action::SendFit { task: t, to } => {
                        task = Some((**t).clone());
                        for (c, id) in to {
                            self.sites.get_mut(c).unwrap().task = *id;
                            if silent
                                .iter()
                                .any(|(s, st)| id_of(s) == *c && *st == Stage::Keys)
                            {
                                quiet.push(c.clone());
                            }
                            if quiet.contains(c) {
                                continue;
                            }
                            inputs.extend(self.step(c, Stage::Keys, None, drop, &begin, &task));
                        }
                    }
                    Action::SendSecure(msgs) => {
                        for (c, _, msg) in msgs {
                            let stage = match msg {
                                Secure::Roster(_) => Stage::Shares,
                                Secure::Delivered(_) => Stage::Masked,
                                Secure::Survivors(_) => Stage::Consistency,
                                _ => Stage::Reveal,
                            };
                            if silent.iter().any(|(s, st)| id_of(s) == *c && *st == stage) {
                                quiet.push(c.clone());
                            }
                            if quiet.contains(c) {
                                continue;
                            }
                            inputs.extend(self.step(
                                c,
                                stage,
                                Some(msg.clone()),
                                drop,
                                &begin,
                                &task,
                            ));
                        }
                    }
                    _ => {}
                }
            }
            all.append(&mut pending);
            for i in inputs {
                self.m.handle(i, self.now);
            }
            pending = actions(&mut self.m, self.now);
        }
        all
    }

    /// One site's answer to one step, or its disconnection.
    fn step(
        &mut self,
        c: &CenterId,
        stage: Stage,
        msg: Option<Secure>,
        drop: &[(&str, Stage)],
        begin: &Option<SecureBegin>,
        task: &Option<FitTask>,
    ) -> Option<Input> {
        let site = self.sites.get_mut(c).unwrap();
        if drop.iter().any(|(d, s)| id(d) == *c && *s == stage) {
            return Some(Input::Disconnected {
                center: c.clone(),
                connection: CENTRES.iter().position(|x| id(x) == *c).unwrap() as u64,
            });
        }
        let reply = match msg {
            None => {
                let (p, keys) = Participant::begin(
                    "run",
                    c.clone(),
                    begin.clone().unwrap(),
                    self.federation.clone(),
                    &site.signer,
                )
                .unwrap();
                site.participant = Some(p);
                keys
            }
            Some(m) => {
                let p = site.participant.as_mut().unwrap();
                match m {
                    Secure::Roster(r) => p.roster(r).unwrap(),
                    Secure::Delivered(d) => {
                        p.delivered(d).unwrap();
                        let task = task.as_ref().unwrap();
                        let (w, n) = &self.updates[c];
                        let result = FitResult {
                            round: task.round,
                            weights: w.clone(),
                            examples: *n,
                            train_loss: 0.5,
                        };
                        let v = FitLayout::of(task)
                            .unwrap()
                            .vector(&result, &task.weights, begin.as_ref().unwrap().norm_bound)
                            .unwrap();
                        p.mask(&v, None).unwrap()
                    }
                    Secure::Survivors(s) => p.survivors(s, &site.signer).unwrap(),
                    Secure::Unmask(s) => p.unmask(s).unwrap(),
                    other => panic!("unexpected {}", other.name()),
                }
            }
        };
        Some(Input::Secure {
            center: c.clone(),
            task: site.task,
            message: reply,
        })
    }

    /// The plain FedAvg of the updates of `who`.
    fn mean_of(&self, who: &[&str]) -> Vec<f64> {
        let mut sum = [0.0; 4];
        let mut n = 0.0;
        for c in who {
            let (w, k) = &self.updates[&id(c)];
            for (s, v) in sum
                .iter_mut()
                .zip(w.require("conv.weight").unwrap().to_f64_vec())
            {
                *s += *k as f64 * v;
            }
            n += *k as f64;
        }
        sum.iter().map(|s| s / n).collect()
    }
}

fn id_of(s: &str) -> CenterId {
    id(s)
}

fn assert_mean(acts: &[Action], want: &[f64]) {
    let round = committed(acts).expect("the round is committed");
    let got = round.weights.require("conv.weight").unwrap().to_f64_vec();
    for (g, w) in got.iter().zip(want) {
        // f32 weights: the fixed point's 3e-8 is below their own rounding.
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn the_securely_aggregated_round_is_the_plain_fedavg_and_the_server_sees_no_update() {
    let mut h = harness(3, 0);
    let acts = h.run(&[], &[]);
    assert_mean(&acts, &h.mean_of(&CENTRES));
    // To the bit: the plain FedAvg of the same updates.
    let mut plain = crate::aggregate::FedAvg::new(&model(&[0.0; 4], 1.0));
    for (w, n) in h.updates.values() {
        plain.fold(w, *n).unwrap();
    }
    let plain = plain.finish().unwrap().unwrap();
    assert_eq!(*committed(&acts).unwrap().weights, plain);
    let round = committed(&acts).unwrap();
    let secure = round.secure.expect("the round's totals");
    assert_eq!(secure.examples, 10 + 15 + 20 + 25);
    assert!((secure.train_loss - 0.5).abs() < 1e-6);
    assert_eq!(round.contributions.len(), 4);
    assert!(
        round.contributions.iter().all(|c| c.examples == 0),
        "no centre's own count"
    );
    // A plain update on a secure run's task is refused.
    let accepted = acts
        .iter()
        .filter(|a| matches!(a, Action::Accept { .. }))
        .count();
    assert_eq!(accepted, 4);
}

#[test]
fn a_centre_dropping_at_any_step_leaves_the_mean_of_those_whose_inputs_arrived() {
    for (stage, inputs) in [
        (Stage::Keys, vec!["a", "b", "c"]),
        (Stage::Shares, vec!["a", "b", "c"]),
        (Stage::Masked, vec!["a", "b", "c"]),
        (Stage::Consistency, vec!["a", "b", "c", "d"]),
        (Stage::Reveal, vec!["a", "b", "c", "d"]),
    ] {
        let mut h = harness(3, 0);
        let acts = h.run(&[("d", stage)], &[]);
        assert_mean(&acts, &h.mean_of(&inputs));
        // Silent instead of gone: the same, once the step's deadline has passed.
        let mut h = harness(3, 0);
        let acts = h.run(&[], &[("d", stage)]);
        assert_mean(&acts, &h.mean_of(&inputs));
    }
}

#[test]
fn with_fewer_than_the_threshold_left_the_round_fails_saying_why() {
    let mut h = harness(3, 0);
    let acts = h.run(&[("c", Stage::Masked), ("d", Stage::Masked)], &[]);
    assert!(committed(&acts).is_none());
    let Some(Action::Finish(Outcome::Failed { reason, .. })) = acts.last() else {
        panic!("{acts:?}")
    };
    assert!(reason.contains("fewer than the threshold of 3"), "{reason}");
}

#[test]
fn a_centre_that_sends_a_plain_update_in_a_secure_round_is_refused() {
    let mut h = harness(3, 0);
    let acts = actions(&mut h.m, h.now);
    let to = sent(&acts);
    answer(&mut h.m, "a", to["a"], 1, update(0).0, 10, h.now);
    let acts = actions(&mut h.m, h.now);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Refuse {
            refusal: UpdateRefusal::NotMasked,
            ..
        }
    )));
}

/// Centre `i`'s landmarks: each sequence's 0 to 1 scale bent by the centre and the sequence.
fn landmarks_update(i: usize) -> (Weights, u64) {
    let mut l = [[0.0; 11]; 3];
    for (s, row) in l.iter_mut().enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = (k as f64 / 10.0).powf(0.6 + 0.3 * i as f64 + 0.1 * s as f64);
        }
    }
    (landmark_weights(&l).unwrap(), 10 + 5 * i as u64)
}

/// The same, but centre 3's DWI zigzags between -50 and 50.
fn lying_landmarks_update(i: usize) -> (Weights, u64) {
    if i < 3 {
        return landmarks_update(i);
    }
    let mut l = landmarks_of(&landmarks_update(i).0).unwrap();
    for (k, v) in l[1].iter_mut().enumerate().take(10).skip(1) {
        *v = if k % 2 == 0 { -50.0 } else { 50.0 };
    }
    (landmark_weights(&l).unwrap(), 25)
}

fn landmarks_settings(threshold: usize) -> RoundSettings {
    RoundSettings {
        strategy: Strategy::Landmarks,
        ..settings(threshold)
    }
}

#[test]
fn a_landmarks_round_through_secure_sums_is_the_image_weighted_mean_and_no_norm_bounds_it() {
    let zeros = landmark_weights(&[[0.0; 11]; 3]).unwrap();
    let mut h = harness_of(landmarks_settings(3), zeros.clone(), landmarks_update, 3, 0);
    let acts = h.run(&[], &[]);
    // A model step's bound (10 here) is not the landmarks': they are no step from the zeros.
    let begin = acts
        .iter()
        .find_map(|a| match a {
            Action::BeginSecure { begin, .. } => Some(begin),
            _ => None,
        })
        .expect("a secure sum begins");
    assert_eq!(begin.norm_bound, None);
    let round = committed(&acts).expect("the round commits");
    let mean = landmarks_of(&round.weights).unwrap();
    let updates: Vec<(Weights, u64)> = (0..4).map(landmarks_update).collect();
    let images: u64 = updates.iter().map(|(_, n)| n).sum();
    for (s, sequence) in mean.iter().enumerate() {
        for (k, got) in sequence.iter().enumerate() {
            let want = updates
                .iter()
                .map(|(w, n)| landmarks_of(w).unwrap()[s][k] * *n as f64)
                .sum::<f64>()
                / images as f64;
            assert!((got - want).abs() < 1e-12, "{s} {k}");
        }
        assert_eq!((sequence[0], sequence[10]), (0.0, 1.0));
    }
    // A centre's zigzag, unseen inside the sum, still breaks the mean: the round fails naming the sequence.
    let mut h = harness_of(landmarks_settings(3), zeros, lying_landmarks_update, 3, 0);
    let acts = h.run(&[], &[]);
    assert!(committed(&acts).is_none());
    let Some(Action::Finish(Outcome::Failed { reason, .. })) = acts.last() else {
        panic!("{acts:?}")
    };
    assert!(
        reason.contains("no intensity scale") && reason.contains("dwi"),
        "{reason}"
    );
}
