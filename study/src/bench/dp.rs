//! The cost of differential privacy in training (`fedslm bench dp`): a DP-SGD step (each patient's gradient
//! alone, clipped, summed, noised from the secure generator, then the optimiser) against a plain step
//! (forward, backward and optimiser on the batch at once) of the same network on the same patients and
//! threads, in turn, as medians over timed steps.

use std::time::Instant;

use fedslm_cohort::{Rng, Sample};
use fedslm_metrics::dp::SecureNoise;
use fedslm_model::dp::DpTraining;
use fedslm_model::{ModelKind, Network, Trainer};
use serde::Serialize;

use super::train::{bench_config, median, samples, BenchNet};
use crate::StudyError;

/// One network's medians (milliseconds per step of `batch` patients).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpTiming {
    pub name: String,
    pub batch: usize,
    pub plain: f64,
    pub private: f64,
}

impl DpTiming {
    /// The DP step's time over the plain step's.
    pub fn ratio(&self) -> f64 {
        self.private / self.plain
    }
}

/// Times `steps` plain and `steps` DP-SGD steps of `net`, alternating, on batches of `batch`.
pub fn time_dp(
    net: &BenchNet,
    batch: usize,
    warmup: usize,
    steps: usize,
    rng: &mut Rng,
) -> Result<DpTiming, StudyError> {
    let network = Network::new(ModelKind::Combined, net.config, 1)?;
    let data = samples(batch, &net.config, rng);
    let batch_of: Vec<&Sample> = data.iter().collect();
    let dp = DpTraining {
        clip: 1.0,
        noise_multiplier: 1.0,
        sample_rate: 0.25,
    };
    let cfg = bench_config(batch);
    let mut trainer = Trainer::new(&network, &cfg)?;
    let mut noise = SecureNoise::from_os().map_err(|e| StudyError::Failed(e.to_string()))?;
    let (mut plain, mut private) = (Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let forward = trainer.forward(&batch_of, rng)?;
        let grads = trainer.backward(&forward)?;
        trainer.update(&grads, cfg.learning_rate)?;
        drop((grads, forward));
        let t1 = Instant::now();
        let clipped = trainer.clipped_sum(&batch_of, rng, dp.clip)?;
        trainer.private_step(clipped, &dp, batch as f64, &mut noise, cfg.learning_rate)?;
        let t2 = Instant::now();
        if i >= warmup {
            plain.push(1e3 * (t1 - t0).as_secs_f64());
            private.push(1e3 * (t2 - t1).as_secs_f64());
        }
    }
    Ok(DpTiming {
        name: net.name.into(),
        batch,
        plain: median(plain),
        private: median(private),
    })
}
