//! The centre's data, loaded and checked before the node connects: nothing leaves a site whose data are bad.

use fedslm_client::ClientConfig;
use fedslm_cohort::{load_center, open_cohort, ImagePaths, Manifest, Patient, Sample};
use fedslm_protocol::folds::{FoldAssignment, Selection};
use fedslm_protocol::SampleCounts;

use crate::NodeError;

/// One centre's cohort: its manifest, and its patients' preprocessed images where the manifest names any.
pub struct SiteCohort {
    pub center: String,
    pub manifest: Manifest,
    pub samples: Vec<Sample>,
}

impl SiteCohort {
    /// Loads the cohort that `config` names: one centre's manifest, and its images preprocessed (through the
    /// cache where one is configured). A centre with clinical data only takes part in the clinical model.
    pub fn load(config: &ClientConfig) -> Result<SiteCohort, NodeError> {
        let dir = config.cohort.as_ref().ok_or(NodeError::NoCohort)?;
        let mut centers = open_cohort(dir, &config.coding, &[])?;
        if centers.len() != 1 {
            return Err(NodeError::NotOneCenter {
                dir: dir.clone(),
                found: centers.len(),
                names: centers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let (center, manifest) = centers.remove(0);
        let has_images = |p: &Patient| {
            ImagePaths::COLUMNS
                .iter()
                .any(|c| p.images.get(c).is_some())
        };
        let samples = if manifest.patients.iter().any(has_images) {
            load_center(
                &manifest,
                &center,
                &config.coding,
                &config.preprocess,
                config.cache.as_deref(),
            )
            .map_err(|source| NodeError::Load {
                dir: dir.clone(),
                source: Box::new(source),
            })?
            .0
        } else {
            Vec::new()
        };
        Ok(SiteCohort {
            center,
            manifest,
            samples,
        })
    }

    /// What the node tells the server in its Hello: counts only.
    pub fn counts(&self) -> SampleCounts {
        let labelled = self.manifest.patients.iter().filter(|p| p.slm.is_some());
        SampleCounts {
            patients: self.manifest.patients.len() as u64,
            positives: labelled.filter(|p| p.slm == Some(true)).count() as u64,
            with_images: self.samples.len() as u64,
        }
    }

    /// Patients with images and a known outcome in the selection: those a network trains and is evaluated on.
    pub fn labelled_samples(&self, selection: Selection) -> Vec<&Sample> {
        let mut samples = self.samples_in(selection);
        samples.retain(|s| s.label.is_some());
        samples
    }

    /// Patients with images in the selection, labelled or not: those AdaBN takes its statistics from.
    pub fn samples_in(&self, selection: Selection) -> Vec<&Sample> {
        let folds = self.folds(selection);
        self.samples
            .iter()
            .filter(|s| folds.keeps(&s.patient_id))
            .collect()
    }

    /// Patients with a known outcome in the selection: those the clinical model is fitted and evaluated on.
    pub fn labelled_patients(&self, selection: Selection) -> Vec<&Patient> {
        let folds = self.folds(selection);
        self.manifest
            .patients
            .iter()
            .filter(|p| p.slm.is_some() && folds.keeps(&p.id))
            .collect()
    }

    /// The folds of the wire contract (`fedslm_protocol::folds`), dealt over the manifest's labelled patients in
    /// manifest order. The clinical model and the networks use the same split (a patient without images is
    /// simply absent from the networks').
    fn folds(&self, selection: Selection) -> FoldAssignment {
        let labelled = self
            .manifest
            .patients
            .iter()
            .filter_map(|p| p.slm.map(|y| (p.id.as_str(), y)));
        FoldAssignment::new(selection, &self.center, labelled)
    }
}
