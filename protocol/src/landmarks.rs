//! Intensity landmarks on the wire (`LocalObjective::Landmarks`): a centre's mean Nyúl-Udupa landmarks of
//! T2W, DWI and ADC, each on its images' own 0-1 range, in f64 so that the server's example-weighted mean is
//! the mean over every training centre's images.

use crate::weights::{Tensor, TensorRole, Weights, WeightsError};

/// The landmarks, `[3, 11]`: T2W, DWI and ADC, each at the 1st, 10th, 20th, ..., 90th and 99th percentiles.
pub const LANDMARKS: &str = "intensity.landmarks";

/// The sequences, in crop order and in the tensor's rows.
pub const SEQUENCES: [&str; 3] = ["t2w", "dwi", "adc"];

/// Landmarks per sequence ([`SEQUENCES`]).
pub type SequenceLandmarks = [[f64; 11]; 3];

/// `landmarks` as the one tensor a centre sends (and the zeros a run of landmarks starts from).
pub fn landmark_weights(landmarks: &SequenceLandmarks) -> Result<Weights, WeightsError> {
    let flat: Vec<f64> = landmarks.iter().flatten().copied().collect();
    Weights::from_tensors(vec![Tensor::from_f64(
        LANDMARKS,
        vec![3, 11],
        TensorRole::Parameter,
        &flat,
    )?])
}

/// The landmarks in `w`, which must hold them in [`landmark_weights`]' shape.
pub fn landmarks_of(w: &Weights) -> Result<SequenceLandmarks, WeightsError> {
    let t = w.require(LANDMARKS)?;
    if t.shape() != [3, 11] {
        return Err(WeightsError::Shape {
            name: LANDMARKS.into(),
            shape: t.shape().to_vec(),
            expected: vec![3, 11],
        });
    }
    let v = t.to_f64_vec();
    let mut out = [[0.0; 11]; 3];
    for (s, row) in out.iter_mut().enumerate() {
        row.copy_from_slice(&v[s * 11..(s + 1) * 11]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landmarks_round_trip_and_another_shape_is_named() {
        let mut l = [[0.0; 11]; 3];
        for (s, row) in l.iter_mut().enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = (s * 11 + i) as f64 / 40.0 + 1e-13;
            }
        }
        assert_eq!(landmarks_of(&landmark_weights(&l).unwrap()).unwrap(), l);
        let other = Weights::from_tensors(vec![Tensor::from_f64(
            LANDMARKS,
            vec![33],
            TensorRole::Parameter,
            &[0.0; 33],
        )
        .unwrap()])
        .unwrap();
        let e = landmarks_of(&other).unwrap_err().to_string();
        assert!(
            e.contains("intensity.landmarks") && e.contains("[33]"),
            "{e}"
        );
    }
}
