//! Cross-validation folds, part of the wire contract: a [`Fold`] in a task names a split that every centre
//! deals on its own from its manifest, so a peer in another language must deal it alike. PROTOCOL.md gives the
//! algorithm step by step and the test vector below.
//!
//! A centre's labelled patients (outcome known), in manifest order, are dealt into `count` folds, stratified by
//! outcome: the positives' indices shuffled, then the negatives', by one generator seeded with
//! [`centre_seed`]`(fold.seed, centre)`, and dealt round-robin across both classes. A fit task with a fold trains
//! on the other folds; an evaluation with a fold evaluates that fold only.

use std::collections::HashMap;

use crate::rng::Rng;
use crate::Fold;

/// Stratified k-fold: the fold (0..k) of each patient, positives and negatives dealt out separately so that
/// every fold keeps the prevalence.
pub fn stratified_folds(labels: &[bool], k: usize, seed: u64) -> Vec<usize> {
    let k = k.max(1);
    let mut rng = Rng::new(seed);
    let mut folds = vec![0; labels.len()];
    let mut next = 0;
    for class in [true, false] {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut idx);
        for i in idx {
            folds[i] = next % k;
            next += 1;
        }
    }
    folds
}

/// A seed made a centre's own: FNV-1a (64-bit) over the centre id's bytes, XORed into `seed`. The folds'
/// generator and a centre's local training draw from it, so that centres differ and each is reproducible.
pub fn center_seed(seed: u64, center: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in center.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    seed ^ h
}

/// Which of a centre's labelled patients a task is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every labelled patient.
    All,
    /// Every labelled patient outside the fold (a fit task's training set).
    Outside(Fold),
    /// The fold's patients only (an evaluation of a held-out fold).
    Inside(Fold),
}

impl Selection {
    /// A fit task's patients: all, or those outside its fold.
    pub fn fit(fold: Option<Fold>) -> Selection {
        fold.map_or(Selection::All, Selection::Outside)
    }

    /// An evaluation's patients: all, or those inside its fold.
    pub fn evaluate(fold: Option<Fold>) -> Selection {
        fold.map_or(Selection::All, Selection::Inside)
    }
}

/// Each labelled patient's fold at one centre, and which of them a [`Selection`] keeps.
#[derive(Debug, Clone)]
pub struct FoldAssignment {
    selection: Selection,
    fold_of: HashMap<String, u32>,
}

impl FoldAssignment {
    /// Deals `labelled` (each labelled patient's id and outcome, in manifest order) at `centre`.
    pub fn new<'a>(
        selection: Selection,
        center: &str,
        labelled: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> FoldAssignment {
        let fold = match selection {
            Selection::All => {
                return FoldAssignment {
                    selection,
                    fold_of: HashMap::new(),
                }
            }
            Selection::Outside(f) | Selection::Inside(f) => f,
        };
        let (ids, labels): (Vec<&str>, Vec<bool>) = labelled.into_iter().unzip();
        let dealt = stratified_folds(&labels, fold.count as usize, center_seed(fold.seed, center));
        FoldAssignment {
            selection,
            fold_of: ids
                .into_iter()
                .zip(dealt)
                .map(|(id, f)| (id.to_string(), f as u32))
                .collect(),
        }
    }

    /// Whether the selection keeps this labelled patient.
    pub fn keeps(&self, patient: &str) -> bool {
        match self.selection {
            Selection::All => true,
            Selection::Outside(f) => self.fold_of.get(patient).is_some_and(|&i| i != f.index),
            Selection::Inside(f) => self.fold_of.get(patient) == Some(&f.index),
        }
    }

    /// The fold a labelled patient was dealt into (`None` under [`Selection::All`] or for an unknown id).
    pub fn fold_of(&self, patient: &str) -> Option<u32> {
        self.fold_of.get(patient).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md's test vector: centre `center-a`, fold seed 42, five folds, ten labelled patients
    /// P01..P10 whose outcomes are 1,0,0,1,0,0,0,1,0,0.
    #[test]
    fn the_protocols_test_vector() {
        assert_eq!(center_seed(42, "center-a"), 0x561d_0b87_a64e_3554);
        let outcomes = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0];
        let ids: Vec<String> = (1..=10).map(|i| format!("P{i:02}")).collect();
        let fold = Fold::new(0, 5, 42).unwrap();
        let a = FoldAssignment::new(
            Selection::Inside(fold),
            "center-a",
            ids.iter().map(String::as_str).zip(outcomes.map(|y| y == 1)),
        );
        let dealt: Vec<u32> = ids.iter().map(|p| a.fold_of(p).unwrap()).collect();
        assert_eq!(dealt, VECTOR);
    }

    /// Computed from PROTOCOL.md's description by an independent implementation (Python).
    const VECTOR: [u32; 10] = [0, 4, 3, 1, 1, 0, 4, 2, 2, 3];

    #[test]
    fn every_fold_keeps_the_prevalence_and_inside_and_outside_partition_the_patients() {
        let labels: Vec<bool> = (0..50).map(|i| i % 5 == 0).collect();
        let ids: Vec<String> = (0..50).map(|i| format!("P{i}")).collect();
        let labelled = || ids.iter().map(String::as_str).zip(labels.iter().copied());
        for index in 0..5 {
            let fold = Fold::new(index, 5, 7).unwrap();
            let inside = FoldAssignment::new(Selection::Inside(fold), "c", labelled());
            let outside = FoldAssignment::new(Selection::Outside(fold), "c", labelled());
            let kept: Vec<bool> = ids.iter().map(|p| inside.keeps(p)).collect();
            assert_eq!(kept.iter().filter(|&&k| k).count(), 10);
            let positives = ids
                .iter()
                .zip(&labels)
                .filter(|(p, &y)| y && inside.keeps(p));
            assert_eq!(positives.count(), 2);
            for (p, k) in ids.iter().zip(kept) {
                assert_ne!(outside.keeps(p), k, "{p}");
            }
            assert!(!inside.keeps("unknown") && !outside.keeps("unknown"));
        }
        let other = FoldAssignment::new(
            Selection::Inside(Fold::new(0, 5, 7).unwrap()),
            "d",
            labelled(),
        );
        let same = FoldAssignment::new(
            Selection::Inside(Fold::new(0, 5, 7).unwrap()),
            "c",
            labelled(),
        );
        assert!(ids.iter().any(|p| other.fold_of(p) != same.fold_of(p)));
        assert!(FoldAssignment::new(Selection::All, "c", labelled()).keeps("anyone"));
    }
}
