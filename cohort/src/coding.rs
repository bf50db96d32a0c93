//! The clinical factors as the models see them (DESIGN.md §5): male; tumour site low and high against mid;
//! CEA and CA19-9 above their cut-offs.

use sha2::{Digest, Sha256};

use crate::manifest::{Patient, Sex, Site};

/// What to do with a patient whose CEA or CA19-9 is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// Refuse the manifest, naming the patient (the default: a model should not silently learn from gaps).
    #[default]
    Error,
    /// Leave the patient out, with a warning.
    Exclude,
    /// Code the missing marker as not elevated.
    Normal,
}

impl MissingPolicy {
    pub fn name(self) -> &'static str {
        match self {
            MissingPolicy::Error => "error",
            MissingPolicy::Exclude => "exclude",
            MissingPolicy::Normal => "normal",
        }
    }
}

/// How clinical factors become the model's covariates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClinicalCoding {
    /// CEA above this (ng/mL) is elevated.
    pub cea_cutoff: f64,
    /// CA19-9 above this (U/mL) is elevated.
    pub ca199_cutoff: f64,
    pub missing: MissingPolicy,
}

impl Default for ClinicalCoding {
    fn default() -> ClinicalCoding {
        ClinicalCoding {
            cea_cutoff: 5.0,
            ca199_cutoff: 37.0,
            missing: MissingPolicy::Error,
        }
    }
}

impl ClinicalCoding {
    /// Names of the coded covariates, in the order of [`ClinicalCoding::encode`].
    pub const FEATURES: [&'static str; 5] =
        ["male", "site_low", "site_high", "cea_high", "ca199_high"];

    /// A patient's covariates: 0/1 indicators.
    pub fn encode(&self, p: &Patient) -> [f64; 5] {
        let b = |c: bool| if c { 1.0 } else { 0.0 };
        [
            b(p.sex == Sex::Male),
            b(p.site == Site::Low),
            b(p.site == Site::High),
            b(p.cea.is_some_and(|v| v > self.cea_cutoff)),
            b(p.ca199.is_some_and(|v| v > self.ca199_cutoff)),
        ]
    }

    /// SHA-256 of the coding in a fixed text form: centres whose hashes differ would feed the model different
    /// covariates, so the server refuses them.
    pub fn settings_hash(&self) -> [u8; 32] {
        let canonical = format!(
            "fedslm-clinical-coding/1\ncea_cutoff={:?}\nca199_cutoff={:?}\nmissing={}\n",
            self.cea_cutoff,
            self.ca199_cutoff,
            self.missing.name()
        );
        Sha256::digest(canonical.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_and_follows_every_setting() {
        let d = ClinicalCoding::default();
        // Fixed: a change here breaks federations that mix software versions.
        let hex: String = d
            .settings_hash()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, fedslm_hash_of_default());
        let other = [
            ClinicalCoding {
                cea_cutoff: 10.0,
                ..d
            },
            ClinicalCoding {
                ca199_cutoff: 35.0,
                ..d
            },
            ClinicalCoding {
                missing: MissingPolicy::Normal,
                ..d
            },
        ];
        for o in other {
            assert_ne!(o.settings_hash(), d.settings_hash(), "{o:?}");
        }
    }

    fn fedslm_hash_of_default() -> String {
        let text = "fedslm-clinical-coding/1\ncea_cutoff=5.0\nca199_cutoff=37.0\nmissing=error\n";
        Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
