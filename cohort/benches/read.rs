//! Image reading throughput: the reference files of shared/reference/imaging, and a 207-patient cohort's worth
//! of NIfTI (T2W, DWI, ADC, ROI per patient), in MB/s of voxel data (as f64 after rescaling is not counted:
//! the stored bytes are). `cargo bench -p fedslm-cohort --bench read`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedslm_cohort::{read_image, write_nifti, Format, StoreAs, Volume};

fn reference() -> Option<PathBuf> {
    Some(PathBuf::from(env!("FEDSLM_REFERENCE")).join("imaging"))
        .filter(|p| p.join("expected.json").is_file())
}

fn bytes_of(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    } else {
        std::fs::metadata(path).unwrap().len()
    }
}

fn volume(dims: [usize; 3], spacing: [f64; 3], seed: u64) -> Volume {
    let n = dims.iter().product();
    let mut state = seed | 1;
    let data = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f64
        })
        .collect();
    let mut affine = [[0.0; 4]; 4];
    for i in 0..3 {
        affine[i][i] = spacing[i];
    }
    affine[3][3] = 1.0;
    Volume {
        format: Format::Nifti,
        dims: dims.to_vec(),
        spacing: spacing.to_vec(),
        affine,
        dtype: "int16".into(),
        data,
    }
}

fn main() {
    if let Some(dir) = reference() {
        let names = [
            "MR_small.dcm",
            "CT_small.dcm",
            "MR_small_RLE.dcm",
            "emri_small.dcm",
            "anatomical.nii",
            "example4d.nii.gz",
            "functional.nii",
            "series_s0",
        ];
        let rounds = 20;
        let (mut file_bytes, mut voxel_bytes) = (0u64, 0u64);
        let t = Instant::now();
        for _ in 0..rounds {
            for n in names {
                let v = read_image(&dir.join(n)).unwrap();
                voxel_bytes += (v.voxels() * 2) as u64;
                file_bytes += bytes_of(&dir.join(n));
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "reference imaging files x{rounds}: {:.1} MB on disk in {:.2} s: {:.1} MB/s on disk, {:.1} MB/s of 16-bit voxels",
            file_bytes as f64 / 1e6,
            s,
            file_bytes as f64 / 1e6 / s,
            voxel_bytes as f64 / 1e6 / s
        );
    } else {
        println!("shared/reference/imaging not found: skipping the reference files");
    }

    // A cohort like the study's: 207 patients, T2W 256x256x24, DWI and ADC 128x128x24, ROI 256x256x24 (uint8).
    let tmp = tempfile::tempdir().unwrap();
    let patients = 207;
    let t2w = volume([256, 256, 24], [0.7, 0.7, 3.5], 1);
    let dwi = volume([128, 128, 24], [1.4, 1.4, 3.5], 2);
    let roi = Volume {
        data: t2w
            .data
            .iter()
            .map(|v| if *v > 1990.0 { 1.0 } else { 0.0 })
            .collect(),
        ..t2w.clone()
    };
    let mut paths = Vec::new();
    for p in 0..patients {
        let dir = tmp.path().join(format!("P{p:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v, store) in [
            ("t2w", &t2w, StoreAs::Int16),
            ("dwi", &dwi, StoreAs::Int16),
            ("adc", &dwi, StoreAs::Int16),
            ("roi", &roi, StoreAs::Uint8),
        ] {
            let path = dir.join(format!("{name}.nii.gz"));
            write_nifti(&path, v, store).unwrap();
            paths.push((
                path,
                v.voxels() * if store == StoreAs::Uint8 { 1 } else { 2 },
            ));
        }
    }
    let disk: u64 = paths.iter().map(|(p, _)| bytes_of(p)).sum();
    let stored: usize = paths.iter().map(|(_, b)| b).sum();
    let t = Instant::now();
    for (p, _) in &paths {
        let v = read_image(p).unwrap();
        std::hint::black_box(&v);
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{patients}-patient cohort, {} .nii.gz files: {:.1} MB on disk, {:.1} MB of voxels, read in {:.2} s: {:.1} MB/s of voxels, {:.1} MB/s on disk",
        paths.len(),
        disk as f64 / 1e6,
        stored as f64 / 1e6,
        s,
        stored as f64 / 1e6 / s,
        disk as f64 / 1e6 / s
    );
}
