//! The methods against scanner shift that `fedslm simulate --shift` turns on, and the network settings and
//! augmentation they give every site.

use std::path::Path;

use crate::{NetSpec, StudyError};

/// Methods against a change of scanner between the training centres and a validating one (README "Scanner
/// shift"). None of them sends more than a plain run: augmentation, AdaBN and the preprocessing act inside a
/// site, and under FedBN a centre sends the global model's batch-norm tensors back, never its own.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ShiftMethods {
    /// Scanner-style augmentation in every site's local training (and the centralised baseline's), with
    /// these ranges.
    pub scanner_augmentation: Option<fedslm_model::ScannerStyle>,
    /// AdaBN at each validating centre: batch-norm statistics recomputed from its own images before scoring.
    pub adapt_batch_norm: bool,
    /// FedBN: batch-norm layers kept at each training centre, the rest averaged.
    pub fedbn: bool,
    /// Resolution harmonisation: every sequence smoothed in-plane by this Gaussian (mm) before cropping, at
    /// every centre alike (it is part of the preprocessing settings the centres must share); 0: none.
    pub smooth_mm: f64,
    /// A fixed field of view of this side (mm) around each ROI instead of the ROI's box (the tumour's size
    /// and surroundings stay visible); 0: the ROI's box.
    pub fov_mm: f64,
    /// Intensity standardisation (Nyúl-Udupa): a landmarks round first agrees the consortium's scale as the
    /// mean of the training centres' image landmarks (no voxel leaves a site); every centre then maps its
    /// crops onto it.
    pub standardise: bool,
}

impl ShiftMethods {
    /// The defaults, chosen on development cohorts (BENCHMARKS.md, "Scanner shift"): resolution
    /// harmonisation at 3 mm, whose gain in the MRI network's external AUC over the five development cohorts
    /// outweighed its cost internally; no other method did.
    pub const DEFAULT: ShiftMethods = ShiftMethods {
        smooth_mm: 3.0,
        ..ShiftMethods::NONE
    };
    pub const NONE: ShiftMethods = ShiftMethods {
        scanner_augmentation: None,
        adapt_batch_norm: false,
        fedbn: false,
        smooth_mm: 0.0,
        fov_mm: 0.0,
        standardise: false,
    };

    /// The names `--shift` takes, in order.
    pub const NAMES: [&'static str; 4] = ["augment", "adabn", "fedbn", "standardise"];

    /// From `--shift`'s names (`none` alone: none).
    pub fn parse(names: &[String]) -> Result<ShiftMethods, StudyError> {
        let mut m = ShiftMethods::NONE;
        for n in names {
            match n.as_str() {
                "none" if names.len() == 1 => {}
                "augment" => m.scanner_augmentation = Some(fedslm_model::ScannerStyle::default()),
                "adabn" => m.adapt_batch_norm = true,
                "fedbn" => m.fedbn = true,
                "standardise" => m.standardise = true,
                other => {
                    return Err(StudyError::Refused(format!(
                        "--shift {other:?}: use none, or any of {}",
                        ShiftMethods::NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(m)
    }

    /// The names of the methods on, or `["none"]`.
    pub fn names(&self) -> Vec<String> {
        let on = [
            self.scanner_augmentation.is_some(),
            self.adapt_batch_norm,
            self.fedbn,
            self.standardise,
        ];
        let mut names: Vec<String> = ShiftMethods::NAMES
            .iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect();
        if self.smooth_mm > 0.0 {
            names.push(format!("smoothing {} mm", self.smooth_mm));
        }
        if self.fov_mm > 0.0 {
            names.push(format!("field of view {} mm", self.fov_mm));
        }
        if names.is_empty() {
            vec!["none".to_string()]
        } else {
            names
        }
    }

    /// The scanner-style ranges read from a TOML file (the keys of client.toml's `[augmentation.scanner]`),
    /// refused by name unless augmentation is on.
    pub fn with_scanner_style(self, path: &Path) -> Result<ShiftMethods, StudyError> {
        let text = std::fs::read_to_string(path).map_err(|source| StudyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let style: fedslm_model::ScannerStyle = toml::from_str(&text)
            .map_err(|e| StudyError::Refused(format!("{}: {e}", path.display())))?;
        style
            .check()
            .map_err(|e| StudyError::Refused(format!("{}: {e}", path.display())))?;
        if self.scanner_augmentation.is_none() {
            return Err(StudyError::Refused(
                "--scanner-style needs augment among the --shift methods".into(),
            ));
        }
        Ok(ShiftMethods {
            scanner_augmentation: Some(style),
            ..self
        })
    }

    /// The network settings every centre and the centralised baseline share.
    pub fn net(&self) -> NetSpec {
        NetSpec {
            smooth_mm: (self.smooth_mm > 0.0).then_some(self.smooth_mm),
            fov_mm: (self.fov_mm > 0.0).then_some(self.fov_mm),
            ..NetSpec::default()
        }
    }

    /// The augmentation each site trains with.
    pub fn augmentation(&self) -> fedslm_model::Augmentation {
        fedslm_model::Augmentation {
            scanner: self.scanner_augmentation,
            ..fedslm_model::Augmentation::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_methods_are_named_and_an_unknown_one_is_refused() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ShiftMethods::parse(&names(&["none"])).unwrap(),
            ShiftMethods::NONE
        );
        let m = ShiftMethods::parse(&names(&["fedbn", "augment"])).unwrap();
        assert_eq!(
            m.scanner_augmentation,
            Some(fedslm_model::ScannerStyle::CHOSEN)
        );
        assert!(m.fedbn && !m.adapt_batch_norm);
        assert_eq!(m.names(), ["augment", "fedbn"]);
        assert_eq!(ShiftMethods::DEFAULT.names(), ["smoothing 3 mm"]);
        let e = ShiftMethods::parse(&names(&["adabn", "nyul"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"nyul\"") && e.contains("augment, adabn, fedbn, standardise"),
            "{e}"
        );
        assert!(ShiftMethods::parse(&names(&["none", "adabn"])).is_err());
        let smoothed = ShiftMethods {
            smooth_mm: 1.5,
            ..ShiftMethods::NONE
        };
        assert_eq!(smoothed.names(), ["smoothing 1.5 mm"]);
        assert_eq!(smoothed.net().settings().unwrap().1.smooth_mm, 1.5);
        let standardised = ShiftMethods::parse(&names(&["standardise"])).unwrap();
        assert!(standardised.standardise);
        assert_eq!(standardised.names(), ["standardise"]);
        // The scale is agreed in the run: the settings alone carry none.
        assert_eq!(
            standardised.net().settings().unwrap().1.intensity_scale,
            None
        );
    }
}
