//! Splitting patients into virtual centres (as Flower Datasets' partitioners do). Every split is seeded.
//! Cross-validation folds are part of the wire contract: `fedslm_protocol::folds`.

use fedslm_protocol::rng::Rng;

/// How to split a pool of patients into `k` virtual centres.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partitioner {
    /// Shuffled and dealt out evenly.
    Iid,
    /// Label skew: each class is shared among centres by proportions drawn from Dirichlet(alpha); small alpha,
    /// strong skew.
    Dirichlet { alpha: f64 },
    /// Quantity skew: centre sizes drawn from Dirichlet(alpha), patients shuffled.
    Quantity { alpha: f64 },
}

impl std::str::FromStr for Partitioner {
    type Err = crate::error::UnknownName;

    /// `iid`, `dirichlet:ALPHA`, `quantity:ALPHA`.
    fn from_str(s: &str) -> Result<Self, crate::error::UnknownName> {
        Partitioner::parse(s).map_err(crate::error::UnknownName)
    }
}

impl Partitioner {
    fn parse(s: &str) -> Result<Partitioner, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let alpha = || {
            arg.parse::<f64>()
                .ok()
                .filter(|a| *a > 0.0 && a.is_finite())
                .ok_or_else(|| format!("{name} needs a positive alpha, as {name}:0.5"))
        };
        match name {
            "iid" => Ok(Partitioner::Iid),
            "dirichlet" => Ok(Partitioner::Dirichlet { alpha: alpha()? }),
            "quantity" => Ok(Partitioner::Quantity { alpha: alpha()? }),
            _ => Err(format!(
                "unknown partition {s:?}: use iid, dirichlet:ALPHA or quantity:ALPHA"
            )),
        }
    }
}

/// Smallest centre a Dirichlet draw may produce before it is drawn again (as Flower's `min_partition_size`).
const MIN_PER_CENTRE: usize = 2;

/// Indices of `labels` for each of `k` centres; every patient in exactly one.
pub fn partition(labels: &[bool], k: usize, how: Partitioner, seed: u64) -> Vec<Vec<usize>> {
    let k = k.max(1);
    let mut rng = Rng::new(seed);
    let n = labels.len();
    match how {
        Partitioner::Iid => {
            let mut idx: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut idx);
            let mut parts = vec![Vec::new(); k];
            for (i, p) in idx.into_iter().enumerate() {
                parts[i % k].push(p);
            }
            parts
        }
        Partitioner::Quantity { alpha } => {
            let mut idx: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut idx);
            let sizes = draw_sizes(&mut rng, alpha, k, n);
            let mut parts = Vec::with_capacity(k);
            let mut start = 0;
            for s in sizes {
                parts.push(idx[start..start + s].to_vec());
                start += s;
            }
            parts
        }
        Partitioner::Dirichlet { alpha } => {
            for _attempt in 0..100 {
                let mut parts = vec![Vec::new(); k];
                for class in [false, true] {
                    let mut idx: Vec<usize> = (0..n).filter(|&i| labels[i] == class).collect();
                    rng.shuffle(&mut idx);
                    let shares = rng.dirichlet(alpha, k);
                    let mut start = 0;
                    let mut cumulative = 0.0;
                    for (c, share) in shares.iter().enumerate() {
                        cumulative += share;
                        let end = if c == k - 1 {
                            idx.len()
                        } else {
                            ((cumulative * idx.len() as f64).round() as usize).min(idx.len())
                        };
                        parts[c].extend_from_slice(&idx[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                if parts.iter().all(|p| p.len() >= MIN_PER_CENTRE.min(n / k)) {
                    return parts;
                }
            }
            // Extreme skew for this many patients: fall back to the last draw's sizes through quantity skew.
            partition(
                labels,
                k,
                Partitioner::Quantity { alpha },
                seed.wrapping_add(1),
            )
        }
    }
}

fn draw_sizes(rng: &mut Rng, alpha: f64, k: usize, n: usize) -> Vec<usize> {
    let floor = MIN_PER_CENTRE.min(n / k);
    let spare = n - floor * k;
    let shares = rng.dirichlet(alpha, k);
    let mut sizes: Vec<usize> = shares
        .iter()
        .map(|s| floor + (s * spare as f64).floor() as usize)
        .collect();
    let mut left = n - sizes.iter().sum::<usize>();
    let mut c = 0;
    while left > 0 {
        sizes[c % k] += 1;
        left -= 1;
        c += 1;
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<bool> {
        (0..n).map(|i| i % 3 == 0).collect()
    }

    fn check_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn every_patient_once_and_seeded() {
        let l = labels(300);
        for how in [
            Partitioner::Iid,
            Partitioner::Dirichlet { alpha: 0.5 },
            Partitioner::Quantity { alpha: 1.0 },
        ] {
            let p = partition(&l, 8, how, 3);
            assert_eq!(p.len(), 8);
            check_cover(&p, 300);
            assert_eq!(p, partition(&l, 8, how, 3), "{how:?}");
            assert_ne!(p, partition(&l, 8, how, 4), "{how:?}");
        }
    }

    #[test]
    fn dirichlet_skews_labels_more_as_alpha_shrinks() {
        let l = labels(3000);
        let spread = |alpha: f64| {
            let parts = partition(&l, 10, Partitioner::Dirichlet { alpha }, 11);
            let prev: Vec<f64> = parts
                .iter()
                .filter(|p| p.len() > 20)
                .map(|p| p.iter().filter(|&&i| l[i]).count() as f64 / p.len() as f64)
                .collect();
            let mean = prev.iter().sum::<f64>() / prev.len() as f64;
            (prev.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / prev.len() as f64).sqrt()
        };
        assert!(
            spread(0.1) > spread(100.0) * 3.0,
            "{} {}",
            spread(0.1),
            spread(100.0)
        );
        let iid = partition(&l, 10, Partitioner::Iid, 1);
        assert!(iid.iter().all(|p| p.len() == 300));
    }

    #[test]
    fn partitioners_parse_by_name() {
        assert!("dirichlet:x".parse::<Partitioner>().is_err());
        assert_eq!(
            "dirichlet:0.5".parse::<Partitioner>(),
            Ok(Partitioner::Dirichlet { alpha: 0.5 })
        );
    }
}
