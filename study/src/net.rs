//! What a network looks like and what it is fed: the architecture and the coding and preprocessing settings,
//! as `fedslm train`, `fedslm model init` and `fedslm simulate` choose them.

use std::path::PathBuf;

use fedslm_client::ClientConfig;
use fedslm_cohort::{ClinicalCoding, IntensityScale, PreprocessSettings};
use fedslm_model::{ModelKind, NetConfig};

use crate::StudyError;

/// The network families `--arch` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// ResNet-10 of width 8 with a 3x3 stride-2 stem: the default, sized for a 2-core CPU.
    Compact,
    /// ResNet-10 of width 64, torchvision's stem.
    Resnet10,
    /// ResNet-18 of width 64, torchvision's stem: the study's network.
    Resnet18,
    /// ResNet-34 of width 64, torchvision's stem.
    Resnet34,
}

impl Arch {
    pub const ALL: [Arch; 4] = [
        Arch::Compact,
        Arch::Resnet10,
        Arch::Resnet18,
        Arch::Resnet34,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Compact => "compact",
            Arch::Resnet10 => "resnet10",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = StudyError;

    fn from_str(s: &str) -> Result<Arch, StudyError> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| StudyError::Refused(format!("unknown architecture {s:?}")))
    }
}

/// The settings that decide what a network looks like and what it is fed.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub arch: Arch,
    /// Channels of the first stage (default: 8 for compact, 64 otherwise).
    pub width: Option<usize>,
    /// The study's scale: ResNet-18 on 224 x 224 crops of the largest ROI slice (3 channels); overrides
    /// `arch` and the preprocessing's size and neighbours.
    pub study_scale: bool,
    /// A centre's client.toml, for its clinical coding and preprocessing (default: the study's).
    pub settings_from: Option<PathBuf>,
    /// Resolution harmonisation (`PreprocessSettings::smooth_mm`) over whatever the settings say; `None`:
    /// theirs.
    pub smooth_mm: Option<f64>,
    /// A fixed field of view (`PreprocessSettings::fov_mm`) over whatever the settings say; `None`: theirs.
    pub fov_mm: Option<f64>,
    /// Intensity standardisation onto this scale (`PreprocessSettings::intensity_scale`) over whatever the
    /// settings say; `None`: theirs.
    pub intensity_scale: Option<IntensityScale>,
}

impl Default for NetSpec {
    /// The compact network with the study's coding and preprocessing.
    fn default() -> NetSpec {
        NetSpec {
            arch: Arch::Compact,
            width: None,
            study_scale: false,
            settings_from: None,
            smooth_mm: None,
            fov_mm: None,
            intensity_scale: None,
        }
    }
}

impl NetSpec {
    /// The clinical coding and preprocessing to use.
    pub fn settings(&self) -> Result<(ClinicalCoding, PreprocessSettings), StudyError> {
        let (coding, mut preprocess) = match &self.settings_from {
            Some(c) => {
                let config = ClientConfig::load(c)?;
                (config.coding, config.preprocess)
            }
            None => Default::default(),
        };
        if self.study_scale {
            preprocess.size = 224;
            preprocess.neighbours = 0;
        }
        if let Some(mm) = self.smooth_mm {
            preprocess.smooth_mm = mm;
        }
        if let Some(mm) = self.fov_mm {
            preprocess.fov_mm = mm;
        }
        if let Some(scale) = self.intensity_scale {
            preprocess.intensity_scale = Some(scale);
        }
        Ok((coding, preprocess))
    }

    /// The architecture for `kind` on crops made with `preprocess`.
    pub fn config(
        &self,
        kind: ModelKind,
        preprocess: &PreprocessSettings,
    ) -> Result<NetConfig, StudyError> {
        let features = match kind {
            ModelKind::Clinical => {
                return Err(StudyError::Refused(
                    "the clinical model is not an image network".into(),
                ))
            }
            ModelKind::Mri => 0,
            ModelKind::Combined => ClinicalCoding::FEATURES.len(),
        };
        let (c, s) = (preprocess.channels(), preprocess.size);
        let arch = if self.study_scale {
            Arch::Resnet18
        } else {
            self.arch
        };
        let mut config = match arch {
            Arch::Compact => NetConfig::compact(c, s, features),
            Arch::Resnet10 => NetConfig {
                depth: 10,
                ..NetConfig::resnet18(c, s, features)
            },
            Arch::Resnet18 => NetConfig::resnet18(c, s, features),
            Arch::Resnet34 => NetConfig {
                depth: 34,
                ..NetConfig::resnet18(c, s, features)
            },
        };
        if let Some(w) = self.width {
            config.width = w;
        }
        config
            .check()
            .map_err(|e| StudyError::Refused(format!("network architecture: {e}")))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_study_scale_overrides_the_architecture_and_the_crops() {
        let spec = NetSpec {
            study_scale: true,
            ..NetSpec::default()
        };
        let (_, pre) = spec.settings().unwrap();
        assert_eq!((pre.size, pre.neighbours), (224, 0));
        let cfg = spec.config(ModelKind::Combined, &pre).unwrap();
        assert_eq!(
            cfg,
            NetConfig::resnet18(pre.channels(), 224, ClinicalCoding::FEATURES.len())
        );
        assert!(spec.config(ModelKind::Clinical, &pre).is_err());
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
        }
    }
}
