//! Synthetic multi-centre cohorts that behave like the study's, written as real NIfTI files and manifests.
//!
//! # The generative model
//!
//! Each patient has a latent tumour aggressiveness `a ~ N(0, 1)`.
//! - **SLM**: `P(SLM) = sigmoid(alpha_c + 2.0 a)`, with `alpha_c` set so that centre `c` has its prevalence.
//! - **Clinical factors**: `log CEA = log 3 + 0.45 a + 0.8 SLM + 0.9 e` (ng/mL), `log CA19-9 = log 15 + 0.4 a +
//!   0.8 SLM + 1.0 e` (U/mL), both higher with SLM; sex (62% male, +4 points with SLM) and site (45% low, 35%
//!   mid, 20% high, slightly higher with SLM) depend on SLM only weakly.
//! - **Images** (T2W on a 1.25 mm grid, DWI b=800 and ADC on a 2.5 mm grid with their own affine): a pelvis of
//!   soft tissue and muscle around a rectum with its wall, lumen and mesorectal fat; the tumour sits on the rectal
//!   wall. Aggressiveness drives, each with patient-level noise: its size (radius `7 exp(0.06 a + 0.15 e)` mm), an
//!   irregular margin (angular harmonics 3-7 of amplitude `(0.05 + 0.15 sigmoid(1.5 a)) exp(0.25 e)`), a fine
//!   heterogeneous texture (5-10 mm wavelengths, amplitude `(0.10 + 0.30 sigmoid(1.5 a)) exp(0.15 e)`) and its ADC
//!   relative to normal tissue (`0.75 - 0.05 a + 0.05 e`; restricted diffusion brightens the DWI). The image
//!   signal is strong enough for a small CNN trained on the study's 176 patients to come within 0.1 of the
//!   oracle (model/tests/learning.rs), and weaker than the clinical factors' for simple image features.
//! - **Scanners** differ by centre in ways that per-crop z-scoring does not undo: noise level, resolution (an
//!   in-plane Gaussian blur), a bias field, and a non-linear contrast curve (a power law); see [`scanners`]. The
//!   external centre's scanner is older: more noise and blur (which erase the fine texture and margin that carry
//!   most of the image signal), a stronger bias and a flatter contrast, so that image models lose more there
//!   than clinical ones, as the study saw.
//!
//! Calibration (tests/synth_calibration.rs, `large` preset, seeds 1-3, logistic models on the training
//! centres, AUC on 30% held-out internal patients / the external centre): clinical 0.832-0.841 / 0.824-0.865,
//! image features 0.754-0.814 / 0.616-0.691, both 0.866-0.884 / 0.821-0.868. The oracle (latent risk) is about
//! 0.865 in the population.
//!
//! The generator also records the oracle AUC of the latent risk per centre: what no model can beat.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::ImageError;
use crate::nifti_file::{write_nifti, StoreAs};
use crate::volume::{scaled_identity, Format, Volume};
use fedslm_protocol::rng::Rng;

/// A scanner, as far as the images show it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scanner {
    /// Noise standard deviation, relative to soft-tissue signal.
    pub noise: f64,
    /// In-plane Gaussian blur, standard deviation in mm.
    pub blur_mm: f64,
    /// Peak-to-peak amplitude of a smooth multiplicative bias field.
    pub bias: f64,
    /// Exponent of the contrast curve `I -> I_max (I / I_max)^gamma`.
    pub gamma: f64,
}

/// One centre of a synthetic cohort.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CenterSpec {
    pub name: String,
    pub patients: usize,
    pub prevalence: f64,
    pub scanner: Scanner,
}

/// Image grid sizes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Geometry {
    pub t2w_dims: [usize; 3],
    pub t2w_spacing: [f64; 3],
    /// DWI and ADC: coarser in-plane, same field of view and slices.
    pub dwi_dims: [usize; 3],
}

impl Geometry {
    pub fn standard() -> Geometry {
        Geometry {
            t2w_dims: [96, 96, 16],
            t2w_spacing: [1.25, 1.25, 4.0],
            dwi_dims: [48, 48, 16],
        }
    }

    fn dwi_spacing(&self) -> [f64; 3] {
        let fov = |i: usize| self.t2w_dims[i] as f64 * self.t2w_spacing[i];
        [
            fov(0) / self.dwi_dims[0] as f64,
            fov(1) / self.dwi_dims[1] as f64,
            self.t2w_spacing[2],
        ]
    }
}

/// A named configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few patients per centre, for tests.
    Tiny,
    /// As the study: 176 patients at three training centres, 31 at an external one.
    Study,
    /// About 2,000 patients, for calibration checks.
    Large,
}

impl std::str::FromStr for Preset {
    type Err = crate::error::UnknownName;
    fn from_str(s: &str) -> Result<Preset, crate::error::UnknownName> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "study" => Ok(Preset::Study),
            "large" => Ok(Preset::Large),
            _ => Err(crate::error::UnknownName(format!(
                "unknown preset {s:?}: use tiny, study or large"
            ))),
        }
    }
}

pub fn scanners() -> [(&'static str, Scanner); 4] {
    [
        (
            "center-a",
            Scanner {
                noise: 0.04,
                blur_mm: 0.5,
                bias: 0.10,
                gamma: 1.0,
            },
        ),
        (
            "center-b",
            Scanner {
                noise: 0.06,
                blur_mm: 0.9,
                bias: 0.20,
                gamma: 0.85,
            },
        ),
        (
            "center-c",
            Scanner {
                noise: 0.05,
                blur_mm: 0.7,
                bias: 0.15,
                gamma: 1.15,
            },
        ),
        (
            "external",
            Scanner {
                noise: 0.26,
                blur_mm: 3.5,
                bias: 0.35,
                gamma: 0.6,
            },
        ),
    ]
}

impl Preset {
    /// The centres of this preset: patients and SLM prevalence.
    pub fn centers(self) -> Vec<CenterSpec> {
        let sizes: [(usize, f64); 4] = match self {
            Preset::Tiny => [(10, 0.4), (8, 0.4), (8, 0.4), (8, 0.4)],
            Preset::Study => [(70, 0.30), (56, 0.25), (50, 0.35), (31, 0.32)],
            Preset::Large => [(600, 0.30), (500, 0.25), (500, 0.35), (400, 0.32)],
        };
        scanners()
            .into_iter()
            .zip(sizes)
            .map(|((name, scanner), (patients, prevalence))| CenterSpec {
                name: name.to_string(),
                patients,
                prevalence,
                scanner,
            })
            .collect()
    }
}

/// One generated patient, in memory.
#[derive(Debug, Clone)]
pub struct SynthPatient {
    pub id: String,
    pub latent: f64,
    pub slm: bool,
    pub male: bool,
    pub site: &'static str,
    pub cea: f64,
    pub ca199: f64,
    pub t2w: Volume,
    pub dwi: Volume,
    pub adc: Volume,
    pub roi: Volume,
}

impl SynthPatient {
    /// The patient as a manifest row would give it (no image paths: the volumes are in memory).
    pub fn patient(&self) -> crate::manifest::Patient {
        use crate::manifest::{Sex, Site};
        crate::manifest::Patient {
            id: self.id.clone(),
            line: 0,
            slm: Some(self.slm),
            sex: if self.male { Sex::Male } else { Sex::Female },
            site: match self.site {
                "low" => Site::Low,
                "high" => Site::High,
                _ => Site::Mid,
            },
            cea: Some(self.cea),
            ca199: Some(self.ca199),
            images: Default::default(),
        }
    }

    /// The network input of this patient, straight from memory: what [`crate::preprocess_patient`] gives for
    /// the files `write_cohort` writes, without the round trip through disk.
    pub fn sample(
        &self,
        center: &str,
        coding: &crate::ClinicalCoding,
        settings: &crate::PreprocessSettings,
    ) -> Result<crate::Sample, crate::PreprocessError> {
        let image = crate::crop_volumes(
            &self.id,
            "roi",
            [&self.t2w, &self.dwi, &self.adc],
            &self.roi,
            settings,
        )?;
        Ok(crate::Sample {
            patient_id: self.id.clone(),
            center: center.to_string(),
            image,
            channels: settings.channels(),
            size: settings.size,
            clinical: coding
                .encode(&self.patient())
                .iter()
                .map(|&v| v as f32)
                .collect(),
            label: Some(self.slm),
        })
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The intercept giving mean P(SLM) = prevalence over a ~ N(0, 1) with slope `beta` (by bisection over a fixed
/// quadrature, so it is the same everywhere).
fn intercept_for(prevalence: f64, beta: f64) -> f64 {
    let mean = |alpha: f64| {
        let n = 400;
        let mut total = 0.0;
        let mut weight = 0.0;
        for i in 0..n {
            let a = -6.0 + 12.0 * (i as f64 + 0.5) / n as f64;
            let w = (-a * a / 2.0).exp();
            total += w * sigmoid(alpha + beta * a);
            weight += w;
        }
        total / weight
    };
    let (mut lo, mut hi) = (-20.0, 20.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if mean(mid) < prevalence {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

const BETA: f64 = 2.0;

fn affine(spacing: [f64; 3], dims: [usize; 3]) -> [[f64; 4]; 4] {
    // Centred on the volume, RAS, axial slices.
    let mut a = scaled_identity(&spacing);
    for i in 0..3 {
        a[i][3] = -spacing[i] * (dims[i] as f64 - 1.0) / 2.0;
    }
    a
}

/// Tissue at a point of the pelvis (mm, from the volume centre): (T2W signal, DWI S0, ADC in µm²/s, tumour?).
struct Anatomy {
    tumour_center: [f64; 3],
    radius: f64,
    height: f64,
    irregularity: Vec<(f64, f64, f64)>,
    texture: Vec<([f64; 3], f64)>,
    heterogeneity: f64,
    relative_adc: f64,
    /// No point farther than this from the tumour's axis is in it.
    reach: f64,
}

const RECTUM: [f64; 2] = [0.0, -8.0];

impl Anatomy {
    fn new(rng: &mut Rng, a: f64) -> Anatomy {
        let radius = 7.0 * (0.06 * a + 0.15 * rng.normal()).exp();
        let angle = rng.uniform() * std::f64::consts::TAU;
        let wall = 11.0;
        let irregular = (0.05 + 0.15 * sigmoid(1.5 * a)) * (0.25 * rng.normal()).exp();
        let irregularity: Vec<(f64, f64, f64)> = (3..8)
            .map(|k| {
                (
                    k as f64,
                    irregular * rng.normal() / 2.0,
                    rng.uniform() * std::f64::consts::TAU,
                )
            })
            .collect();
        let reach = radius * (1.0 + irregularity.iter().map(|i| i.1.abs()).sum::<f64>());
        let texture = (0..6)
            .map(|_| {
                // Fine texture, 5 to 10 mm wavelengths: a blurred, noisy scanner loses it.
                let f = 0.6 + 0.6 * rng.uniform();
                let dir = [rng.normal(), rng.normal(), 0.3 * rng.normal()];
                let norm = (dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2])
                    .sqrt()
                    .max(1e-9);
                (
                    [f * dir[0] / norm, f * dir[1] / norm, f * dir[2] / norm],
                    rng.uniform() * std::f64::consts::TAU,
                )
            })
            .collect();
        Anatomy {
            tumour_center: [
                RECTUM[0] + wall * angle.cos(),
                RECTUM[1] + wall * angle.sin(),
                4.0 * rng.normal(),
            ],
            radius,
            height: radius * (1.2 + 0.3 * rng.uniform()),
            irregularity,
            texture,
            heterogeneity: (0.10 + 0.30 * sigmoid(1.5 * a)) * (0.15 * rng.normal()).exp(),
            relative_adc: (0.75 - 0.05 * a + 0.05 * rng.normal()).clamp(0.3, 1.1),
            reach,
        }
    }

    fn in_tumour(&self, p: [f64; 3]) -> bool {
        let d = [
            p[0] - self.tumour_center[0],
            p[1] - self.tumour_center[1],
            p[2] - self.tumour_center[2],
        ];
        if d[2].abs() > self.height || d[0] * d[0] + d[1] * d[1] > self.reach * self.reach {
            return false;
        }
        let theta = d[1].atan2(d[0]);
        let bump: f64 = self
            .irregularity
            .iter()
            .map(|(k, amp, phase)| amp * (k * theta + phase).sin())
            .sum();
        let r = self.radius * (1.0 + bump);
        let zfrac = d[2] / self.height;
        (d[0] * d[0] + d[1] * d[1]).sqrt() <= r * (1.0 - zfrac * zfrac).max(0.0).sqrt()
    }

    fn tissue(&self, p: [f64; 3]) -> (f64, f64, f64, bool) {
        let body = (p[0] / 55.0).powi(2) + (p[1] / 42.0).powi(2);
        if body > 1.0 {
            return (0.0, 0.0, 0.0, false);
        }
        if self.in_tumour(p) {
            let tex: f64 = self
                .texture
                .iter()
                .map(|(f, phase)| (f[0] * p[0] + f[1] * p[1] + f[2] * p[2] + phase).sin())
                .sum::<f64>()
                / (self.texture.len() as f64).sqrt();
            let t = 1.0 + self.heterogeneity * tex;
            return (
                380.0 * t,
                520.0 * t,
                1600.0 * self.relative_adc * (1.0 - 0.5 * self.heterogeneity * tex),
                true,
            );
        }
        let r = ((p[0] - RECTUM[0]).powi(2) + (p[1] - RECTUM[1]).powi(2)).sqrt();
        if r < 6.0 {
            (90.0, 150.0, 2600.0, false) // lumen
        } else if r < 10.0 {
            (250.0, 420.0, 1500.0, false) // rectal wall
        } else if r < 22.0 {
            (620.0, 60.0, 400.0, false) // mesorectal fat
        } else if body > 0.8 {
            (200.0, 380.0, 1400.0, false) // pelvic muscle
        } else {
            (320.0, 450.0, 1700.0, false) // other soft tissue
        }
    }
}

/// A scanner's view of an ideal image: blur, bias field, contrast curve, then magnitude noise.
fn acquire(v: &mut Volume, s: &Scanner, reference: f64, rng: &mut Rng, direction: f64) {
    v.blur_in_plane(s.blur_mm);
    let (nx, ny) = (v.dims[0], v.dims[1]);
    let max = v.data.iter().copied().fold(1e-9, f64::max);
    for (i, x) in v.data.iter_mut().enumerate() {
        let (u, w) = (
            (i % nx) as f64 / nx as f64 - 0.5,
            ((i / nx) % ny) as f64 / ny as f64 - 0.5,
        );
        let field = 1.0 + s.bias * (direction.cos() * u + direction.sin() * w);
        let contrasted = max * (x.max(0.0) / max).powf(s.gamma);
        let noisy_re = contrasted * field + s.noise * reference * rng.normal();
        let noisy_im = s.noise * reference * rng.normal();
        *x = (noisy_re * noisy_re + noisy_im * noisy_im).sqrt();
    }
}

/// A patient's first draws: latent aggressiveness and outcome. Partitions need only these, so they are drawn
/// first and cheaply.
fn outcome(rng: &mut Rng, alpha: f64) -> (f64, bool) {
    let a = rng.normal();
    (a, rng.bernoulli(sigmoid(alpha + BETA * a)))
}

/// One patient of a centre with its scanner.
pub fn synth_patient(
    rng: &mut Rng,
    id: String,
    alpha: f64,
    scanner: &Scanner,
    g: &Geometry,
) -> SynthPatient {
    let (a, slm) = outcome(rng, alpha);
    let s = if slm { 1.0 } else { 0.0 };
    let cea = (3.0f64.ln() + 0.45 * a + 0.8 * s + 0.9 * rng.normal()).exp();
    let ca199 = (15.0f64.ln() + 0.4 * a + 0.8 * s + 1.0 * rng.normal()).exp();
    let male = rng.bernoulli(0.62 + 0.04 * s);
    let u = rng.uniform();
    let site = if u < 0.45 - 0.03 * s {
        "low"
    } else if u < 0.80 - 0.05 * s {
        "mid"
    } else {
        "high"
    };
    let anatomy = Anatomy::new(rng, a);

    let t2w_affine = affine(g.t2w_spacing, g.t2w_dims);
    let dwi_spacing = g.dwi_spacing();
    let dwi_affine = affine(dwi_spacing, g.dwi_dims);
    // One pass over each grid: every tissue property of a point at once.
    let sample = |dims: [usize; 3], aff: [[f64; 4]; 4]| {
        let n = dims.iter().product();
        let mut out = [
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        ];
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let p = [
                        aff[0][0] * x as f64 + aff[0][3],
                        aff[1][1] * y as f64 + aff[1][3],
                        aff[2][2] * z as f64 + aff[2][3],
                    ];
                    let (t2, s0, adc, tumour) = anatomy.tissue(p);
                    out[0].push(t2);
                    out[1].push(s0);
                    out[2].push(adc);
                    out[3].push(if tumour { 1.0 } else { 0.0 });
                }
            }
        }
        out
    };
    let volume = |dims: [usize; 3], spacing: [f64; 3], aff, data| Volume {
        format: Format::Nifti,
        dims: dims.to_vec(),
        spacing: spacing.to_vec(),
        affine: aff,
        dtype: "int16".into(),
        data,
    };
    let [t2_data, _, _, roi_data] = sample(g.t2w_dims, t2w_affine);
    let [_, s0, adc_true, _] = sample(g.dwi_dims, dwi_affine);
    let mut t2w = volume(g.t2w_dims, g.t2w_spacing, t2w_affine, t2_data);
    let roi = volume(g.t2w_dims, g.t2w_spacing, t2w_affine, roi_data);
    let dwi_data = s0
        .iter()
        .zip(&adc_true)
        .map(|(s0, adc)| s0 * (-800.0 * adc * 1e-6).exp())
        .collect();
    let mut dwi = volume(g.dwi_dims, dwi_spacing, dwi_affine, dwi_data);
    let mut adc = volume(g.dwi_dims, dwi_spacing, dwi_affine, adc_true);
    let direction = rng.uniform() * std::f64::consts::TAU;
    acquire(&mut t2w, scanner, 320.0, rng, direction);
    acquire(&mut dwi, scanner, 300.0, rng, direction);
    acquire(&mut adc, scanner, 1700.0, rng, direction);
    SynthPatient {
        id,
        latent: a,
        slm,
        male,
        site,
        cea,
        ca199,
        t2w,
        dwi,
        adc,
        roi,
    }
}

fn patient_rng(seed: u64, center_index: usize, patient_index: usize) -> Rng {
    Rng::new(seed)
        .fork(center_index as u64 + 1)
        .fork(patient_index as u64 + 1)
}

fn patient_id(spec: &CenterSpec, i: usize) -> String {
    format!("{}{:04}", id_prefix(&spec.name), i + 1)
}

/// All patients of one centre, in parallel; the same seed gives the same patients whatever the thread count.
pub fn synth_center(
    seed: u64,
    center_index: usize,
    spec: &CenterSpec,
    g: &Geometry,
) -> Vec<SynthPatient> {
    let alpha = intercept_for(spec.prevalence, BETA);
    (0..spec.patients)
        .into_par_iter()
        .map(|i| {
            synth_patient(
                &mut patient_rng(seed, center_index, i),
                patient_id(spec, i),
                alpha,
                &spec.scanner,
                g,
            )
        })
        .collect()
}

/// All patients of one centre as network input, with each one's latent aggressiveness (the oracle's score);
/// volumes are dropped as soon as they are cropped, so even the `large` preset fits in memory.
pub fn synth_center_samples(
    seed: u64,
    center_index: usize,
    spec: &CenterSpec,
    g: &Geometry,
    coding: &crate::ClinicalCoding,
    settings: &crate::PreprocessSettings,
) -> Result<Vec<(crate::Sample, f64)>, crate::PreprocessError> {
    let alpha = intercept_for(spec.prevalence, BETA);
    (0..spec.patients)
        .into_par_iter()
        .map(|i| {
            let p = synth_patient(
                &mut patient_rng(seed, center_index, i),
                patient_id(spec, i),
                alpha,
                &spec.scanner,
                g,
            );
            Ok((p.sample(&spec.name, coding, settings)?, p.latent))
        })
        .collect()
}

fn id_prefix(center: &str) -> String {
    match center.rsplit('-').next() {
        Some(s) if s.len() == 1 => s.to_uppercase(),
        _ => center
            .chars()
            .next()
            .map_or("P".into(), |c| c.to_ascii_uppercase().to_string()),
    }
}

/// Which generated patients go to which written centre: (centre index, patient index) per folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub groups: Vec<(String, Vec<(usize, usize)>)>,
}

impl Plan {
    /// Every centre as itself.
    pub fn natural(centers: &[CenterSpec]) -> Plan {
        Plan {
            groups: centers
                .iter()
                .enumerate()
                .map(|(ci, c)| (c.name.clone(), (0..c.patients).map(|i| (ci, i)).collect()))
                .collect(),
        }
    }

    /// The training centres' patients pooled and split into `k` virtual centres `site-01`, ...; the external
    /// centre (the last) stays as it is, so external validation is unchanged.
    pub fn partitioned(
        seed: u64,
        centers: &[CenterSpec],
        k: usize,
        how: crate::partition::Partitioner,
    ) -> Plan {
        let (external, training) = centers
            .split_last()
            .map_or((None, centers), |(e, t)| (Some(e), t));
        let mut pool = Vec::new();
        let mut labels = Vec::new();
        for (ci, c) in training.iter().enumerate() {
            let alpha = intercept_for(c.prevalence, BETA);
            for i in 0..c.patients {
                pool.push((ci, i));
                labels.push(outcome(&mut patient_rng(seed, ci, i), alpha).1);
            }
        }
        let parts = crate::partition::partition(&labels, k, how, seed);
        let mut groups: Vec<(String, Vec<(usize, usize)>)> = parts
            .into_iter()
            .enumerate()
            .map(|(g, members)| {
                (
                    format!("site-{:02}", g + 1),
                    members.into_iter().map(|m| pool[m]).collect(),
                )
            })
            .collect();
        if let Some(e) = external {
            groups.push((
                e.name.clone(),
                (0..e.patients).map(|i| (centers.len() - 1, i)).collect(),
            ));
        }
        Plan { groups }
    }
}

/// What `fedslm synth` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthReport {
    pub out: PathBuf,
    pub seed: u64,
    pub centers: Vec<CenterReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CenterReport {
    pub name: String,
    pub patients: usize,
    pub positives: usize,
    /// AUC of the generator's own latent risk: the best any model could do (null with one class).
    pub oracle_auc: Option<f64>,
}

impl SynthReport {
    /// The centres as a table: patients, SLM, prevalence and the generator's own (oracle) AUC.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<10} {:>8} {:>5} {:>11} {:>11}\n",
            "centre", "patients", "SLM", "prevalence", "oracle AUC"
        );
        for c in &self.centers {
            t += &format!(
                "{:<10} {:>8} {:>5} {:>10.1}% {:>11}\n",
                c.name,
                c.patients,
                c.positives,
                100.0 * c.positives as f64 / c.patients.max(1) as f64,
                c.oracle_auc.map_or("-".into(), |a| format!("{a:.3}"))
            );
        }
        t
    }
}

/// Writes each group of `plan` as a folder with `manifest.csv` and each patient's `t2w`, `dwi`, `adc`, `roi`
/// `.nii.gz`, and `synth.json` with the settings and each folder's oracle AUC. Patients are generated in
/// parallel and written as they are made, so memory stays small whatever the cohort.
pub fn write_cohort(
    out: &Path,
    seed: u64,
    centers: &[CenterSpec],
    plan: &Plan,
    g: &Geometry,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<SynthReport, ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let alphas: Vec<f64> = centers
        .iter()
        .map(|c| intercept_for(c.prevalence, BETA))
        .collect();
    let mut reports = Vec::new();
    for (name, members) in &plan.groups {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let rows: Vec<(String, f64, bool, String)> = members
            .par_iter()
            .map(|&(ci, i)| -> Result<(String, f64, bool, String), ImageError> {
                let spec = &centers[ci];
                let p = synth_patient(&mut patient_rng(seed, ci, i), patient_id(spec, i), alphas[ci], &spec.scanner, g);
                let pdir = dir.join(&p.id);
                std::fs::create_dir_all(&pdir).map_err(io(&pdir))?;
                write_nifti(&pdir.join("t2w.nii.gz"), &p.t2w, StoreAs::Int16)?;
                write_nifti(&pdir.join("dwi.nii.gz"), &p.dwi, StoreAs::Int16)?;
                write_nifti(&pdir.join("adc.nii.gz"), &p.adc, StoreAs::Int16)?;
                write_nifti(&pdir.join("roi.nii.gz"), &p.roi, StoreAs::Uint8)?;
                progress(1);
                let row = format!(
                    "{id},{},{},{},{:.2},{:.1},{id}/t2w.nii.gz,{id}/dwi.nii.gz,{id}/adc.nii.gz,{id}/roi.nii.gz\n",
                    u8::from(p.slm),
                    if p.male { "M" } else { "F" },
                    p.site,
                    p.cea,
                    p.ca199,
                    id = p.id
                );
                Ok((p.id, p.latent, p.slm, row))
            })
            .collect::<Result<_, _>>()?;
        let mut csv = String::from("patient_id,slm,sex,site,cea,ca199,t2w,dwi,adc,roi\n");
        for r in &rows {
            csv += &r.3;
        }
        let manifest = dir.join("manifest.csv");
        fedslm_files::write_atomic(&manifest, csv.as_bytes()).map_err(io(&manifest))?;
        let labels: Vec<bool> = rows.iter().map(|r| r.2).collect();
        let latent: Vec<f64> = rows.iter().map(|r| r.1).collect();
        reports.push(CenterReport {
            name: name.clone(),
            patients: rows.len(),
            positives: labels.iter().filter(|&&l| l).count(),
            oracle_auc: fedslm_metrics::auc_delong(&labels, &latent)
                .ok()
                .map(|e| e.auc),
        });
    }
    let report = SynthReport {
        out: out.to_path_buf(),
        seed,
        centers: reports,
    };
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "seed": seed,
        "geometry": g,
        "generated_from": centers,
        "written": report.centers,
    }))
    .unwrap_or_default();
    let path = out.join("synth.json");
    fedslm_files::write_atomic(&path, json.as_bytes()).map_err(io(&path))?;
    Ok(report)
}
