//! Every real file in shared/reference/imaging read as pydicom 3.0 and nibabel 5.4 read it.

use fedslm_cohort::{read_image, Format};
use serde_json::Value;

use crate::imaging;

fn rel(got: f64, want: f64) -> f64 {
    if want == 0.0 {
        got.abs()
    } else {
        ((got - want) / want).abs()
    }
}

#[test]
fn every_reference_file_matches_pydicom_and_nibabel() {
    let dir = imaging();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let files = expected.as_object().unwrap();
    assert_eq!(files.len(), 8);
    for (name, e) in files {
        let v = read_image(&dir.join(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(v.format.name(), e["format"].as_str().unwrap(), "{name}");
        let dims: Vec<usize> = e["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(v.dims, dims, "{name} dims");
        let spacing = if v.format == Format::Dicom {
            &e["spacing_xy"]
        } else {
            &e["spacing"]
        };
        match spacing.as_array() {
            Some(s) => {
                for (k, want) in s.iter().enumerate() {
                    let got = v.spacing[k];
                    assert!(
                        (got - want.as_f64().unwrap()).abs() < 1e-5,
                        "{name} spacing {k}: {got} vs {want}"
                    );
                }
            }
            None => assert!(
                v.spacing.is_empty(),
                "{name}: spacing {:?} where the file has none",
                v.spacing
            ),
        }
        let s = v.stats();
        assert_eq!(s.min, e["min"].as_f64().unwrap(), "{name} min");
        assert_eq!(s.max, e["max"].as_f64().unwrap(), "{name} max");
        assert!(
            rel(s.sum, e["sum"].as_f64().unwrap()) < 1e-9,
            "{name} sum {} vs {}",
            s.sum,
            e["sum"]
        );
        assert!(
            rel(s.mean, e["mean"].as_f64().unwrap()) < 1e-9,
            "{name} mean {} vs {}",
            s.mean,
            e["mean"]
        );
    }
}
