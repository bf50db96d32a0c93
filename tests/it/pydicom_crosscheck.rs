//! fedslm's DICOM reader against pydicom, live, on every greyscale file of pydicom's own test data: real files
//! beyond shared/reference, in many transfer syntaxes (RLE, JPEG baseline, JPEG 2000, deflate, big endian,
//! 1- and 32-bit samples). Runs tools/interop/pydicom_stats.py in the Python that tools/test.sh sets up.

use std::path::PathBuf;
use std::process::Command;

use fedslm_cohort::read_dicom_file;
use serde_json::Value;

/// Transfer syntaxes dicom-rs cannot decode in pure Rust here, each with the reason our error must give.
const KNOWN_GAPS: [(&str, &str); 4] = [
    (
        "JPEGLSNearLossless",
        "JPEG-LS needs fedslm built with the jpeg-ls feature",
    ),
    (
        "jpeg_ls",
        "JPEG-LS needs fedslm built with the jpeg-ls feature",
    ),
    ("JPGExtended", "JPEG Extended (12-bit)"),
    ("rtdose_rle", "RLE Lossless"),
];

#[test]
fn every_greyscale_file_pydicom_reads_is_read_the_same() {
    let python = std::env::var("FEDSLM_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/interop/pydicom_stats.py"
    );
    let out = Command::new(&python)
        .arg(script)
        .output()
        .expect("no Python");
    assert!(
        out.status.success(),
        "{python} {script} failed (run the tests with tools/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<Value> = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    let mut compared = 0;
    for f in files.iter().filter(|f| f.get("skip").is_none()) {
        let path = PathBuf::from(f["path"].as_str().unwrap());
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        match read_dicom_file(&path) {
            Ok(v) => {
                let dims: Vec<usize> = f["dims"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(v.dims, dims, "{name}");
                let s = v.stats();
                assert_eq!(s.min, f["min"].as_f64().unwrap(), "{name} min");
                assert_eq!(s.max, f["max"].as_f64().unwrap(), "{name} max");
                let want = f["sum"].as_f64().unwrap();
                assert!(
                    (s.sum - want).abs() <= 1e-9 * want.abs(),
                    "{name} sum {} vs {want}",
                    s.sum
                );
                compared += 1;
            }
            Err(e) => {
                let e = e.to_string();
                let gap = KNOWN_GAPS.iter().find(|(file, _)| name.contains(file));
                match gap {
                    Some((_, reason)) => {
                        assert!(e.contains(&name) && e.contains(reason), "{name}: {e}")
                    }
                    None => panic!("{name}: pydicom reads it, fedslm does not: {e}"),
                }
            }
        }
    }
    assert!(compared >= 20, "only {compared} files compared");
}
