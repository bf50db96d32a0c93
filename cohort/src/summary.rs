//! A cohort at a glance: what `fedslm inspect manifest.csv` prints.

use std::fmt;

use serde::Serialize;

use crate::coding::ClinicalCoding;
use crate::manifest::{ImagePaths, Manifest, Sex, Site};

/// Distribution of a tumour marker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkerSummary {
    pub median: Option<f64>,
    pub q1: Option<f64>,
    pub q3: Option<f64>,
    /// Above the coding's cut-off.
    pub elevated: usize,
    pub cutoff: f64,
    pub missing: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CohortSummary {
    pub patients: usize,
    pub slm_positive: usize,
    pub slm_negative: usize,
    pub slm_unknown: usize,
    /// Among patients with a known outcome.
    pub prevalence: Option<f64>,
    pub male: usize,
    pub female: usize,
    pub site_low: usize,
    pub site_mid: usize,
    pub site_high: usize,
    pub cea: MarkerSummary,
    pub ca199: MarkerSummary,
    /// Patients with each image.
    pub t2w: usize,
    pub dwi: usize,
    pub adc: usize,
    pub roi: usize,
    pub excluded: usize,
}

/// Quantile by linear interpolation between order statistics (R type 7).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

fn marker(values: impl Iterator<Item = Option<f64>>, cutoff: f64) -> MarkerSummary {
    let all: Vec<Option<f64>> = values.collect();
    let mut present: Vec<f64> = all.iter().flatten().copied().collect();
    present.sort_by(f64::total_cmp);
    MarkerSummary {
        median: quantile(&present, 0.5),
        q1: quantile(&present, 0.25),
        q3: quantile(&present, 0.75),
        elevated: present.iter().filter(|&&v| v > cutoff).count(),
        cutoff,
        missing: all.len() - present.len(),
    }
}

impl CohortSummary {
    pub fn of(m: &Manifest, coding: &ClinicalCoding) -> CohortSummary {
        let p = &m.patients;
        let count =
            |f: &dyn Fn(&crate::manifest::Patient) -> bool| p.iter().filter(|x| f(x)).count();
        let positive = count(&|x| x.slm == Some(true));
        let negative = count(&|x| x.slm == Some(false));
        let with = |c: &str| p.iter().filter(|x| x.images.get(c).is_some()).count();
        CohortSummary {
            patients: p.len(),
            slm_positive: positive,
            slm_negative: negative,
            slm_unknown: p.len() - positive - negative,
            prevalence: (positive + negative > 0)
                .then(|| positive as f64 / (positive + negative) as f64),
            male: count(&|x| x.sex == Sex::Male),
            female: count(&|x| x.sex == Sex::Female),
            site_low: count(&|x| x.site == Site::Low),
            site_mid: count(&|x| x.site == Site::Mid),
            site_high: count(&|x| x.site == Site::High),
            cea: marker(p.iter().map(|x| x.cea), coding.cea_cutoff),
            ca199: marker(p.iter().map(|x| x.ca199), coding.ca199_cutoff),
            t2w: with(ImagePaths::COLUMNS[0]),
            dwi: with(ImagePaths::COLUMNS[1]),
            adc: with(ImagePaths::COLUMNS[2]),
            roi: with(ImagePaths::COLUMNS[3]),
            excluded: m.excluded.len(),
        }
    }
}

impl fmt::Display for CohortSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |n: usize| 100.0 * n as f64 / self.patients.max(1) as f64;
        writeln!(f, "patients        {}", self.patients)?;
        write!(
            f,
            "SLM             {} positive, {} negative",
            self.slm_positive, self.slm_negative
        )?;
        if self.slm_unknown > 0 {
            write!(f, ", {} unknown", self.slm_unknown)?;
        }
        match self.prevalence {
            Some(p) => writeln!(f, " (prevalence {:.1}%)", 100.0 * p)?,
            None => writeln!(f)?,
        }
        writeln!(
            f,
            "sex             {} male ({:.1}%), {} female",
            self.male,
            pct(self.male),
            self.female
        )?;
        writeln!(
            f,
            "site            {} low, {} mid, {} high",
            self.site_low, self.site_mid, self.site_high
        )?;
        for (name, unit, m) in [("CEA", "ng/mL", &self.cea), ("CA19-9", "U/mL", &self.ca199)] {
            let q = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            write!(
                f,
                "{name:<15} median {} [IQR {}-{}] {unit}; {} above {} ({:.1}%)",
                q(m.median),
                q(m.q1),
                q(m.q3),
                m.elevated,
                m.cutoff,
                pct(m.elevated)
            )?;
            if m.missing > 0 {
                write!(f, "; {} missing", m.missing)?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "images          T2W {}, DWI {}, ADC {}, ROI {} of {}",
            self.t2w, self.dwi, self.adc, self.roi, self.patients
        )?;
        if self.excluded > 0 {
            writeln!(
                f,
                "excluded        {} (missing tumour markers)",
                self.excluded
            )?;
        }
        Ok(())
    }
}
