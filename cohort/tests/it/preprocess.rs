//! Preprocessing: resampling through the affines (also from DICOM's LPS to NIfTI's RAS), crops, z-scores, the
//! cache, and each error naming its patient.

use std::path::Path;

use fedslm_cohort::*;

use crate::imaging;

fn affine(spacing: [f64; 3], origin: [f64; 3]) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for i in 0..3 {
        a[i][i] = spacing[i];
        a[i][3] = origin[i];
    }
    a[3][3] = 1.0;
    a
}

fn volume(dims: [usize; 3], affine: [[f64; 4]; 4], f: impl Fn([f64; 3]) -> f64) -> Volume {
    let mut data = Vec::new();
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let p = [x as f64, y as f64, z as f64];
                let w: Vec<f64> = (0..3)
                    .map(|r| (0..3).map(|c| affine[r][c] * p[c]).sum::<f64>() + affine[r][3])
                    .collect();
                data.push(f([w[0], w[1], w[2]]));
            }
        }
    }
    Volume {
        format: Format::Nifti,
        dims: dims.to_vec(),
        spacing: (0..3).map(|i| affine[i][i].abs()).collect(),
        affine,
        dtype: "float32".into(),
        data,
    }
}

/// A patient folder with the given volumes and a one-row manifest; returns the manifest.
fn patient(
    dir: &Path,
    id: &str,
    t2w: &Volume,
    dwi: &Volume,
    adc: &Volume,
    roi: &Volume,
) -> Manifest {
    let p = dir.join(id);
    std::fs::create_dir_all(&p).unwrap();
    for (name, v) in [("t2w", t2w), ("dwi", dwi), ("adc", adc), ("roi", roi)] {
        write_nifti(&p.join(format!("{name}.nii.gz")), v, StoreAs::Float32).unwrap();
    }
    let m = dir.join("manifest.csv");
    std::fs::write(
        &m,
        format!("patient_id,slm,sex,site,cea,ca199,t2w,dwi,adc,roi\n{id},1,M,low,12,50,{id}/t2w.nii.gz,{id}/dwi.nii.gz,{id}/adc.nii.gz,{id}/roi.nii.gz\n"),
    )
    .unwrap();
    Manifest::read(&m, &ClinicalCoding::default()).unwrap()
}

fn linear(w: [f64; 3]) -> f64 {
    2.0 * w[0] + 3.0 * w[1] + 0.5 * w[2] + 100.0
}

fn blob(largest: usize) -> impl Fn([f64; 3]) -> f64 {
    // On the 1 mm T2W grid below: a 6x4 mm box in slice `largest`, smaller next to it.
    move |w| {
        let z = (w[2] / 3.0).round() as usize;
        let half = if z == largest {
            3.0
        } else if z + 1 == largest || z == largest + 1 {
            1.0
        } else {
            -1.0
        };
        if (w[0] - 16.0).abs() <= half && (w[1] - 15.0).abs() <= half * 2.0 / 3.0 {
            1.0
        } else {
            0.0
        }
    }
}

#[test]
fn dwi_and_adc_on_another_grid_are_resampled_through_the_affines() {
    let tmp = tempfile::tempdir().unwrap();
    let t2w_affine = affine([1.0, 1.0, 3.0], [0.0, 0.0, 0.0]);
    let t2w = volume([32, 32, 8], t2w_affine, linear);
    // DWI and ADC: half the resolution, a different origin; the same linear function of position.
    let coarse = affine([2.0, 2.0, 3.0], [-3.0, 1.0, 0.0]);
    let dwi = volume([20, 20, 8], coarse, linear);
    let adc = volume([20, 20, 8], coarse, |w| -linear(w));
    let roi = volume([32, 32, 8], t2w_affine, blob(5));
    let m = patient(tmp.path(), "P0001", &t2w, &dwi, &adc, &roi);
    let settings = PreprocessSettings {
        size: 16,
        neighbours: 1,
        margin: 0.5,
        ..PreprocessSettings::default()
    };
    let s = preprocess_patient(
        &m.patients[0],
        "center-a",
        &ClinicalCoding::default(),
        &settings,
    )
    .unwrap();
    assert_eq!((s.channels, s.size, s.image.len()), (9, 16, 9 * 256));
    assert_eq!(s.clinical, vec![1.0, 1.0, 0.0, 1.0, 1.0]);
    assert_eq!(s.label, Some(true));
    let plane = 3 * 256;
    let (t, d, a) = (
        &s.image[..plane],
        &s.image[plane..2 * plane],
        &s.image[2 * plane..],
    );
    // Trilinear interpolation is exact for a linear function: after z-scoring, T2W and DWI agree, ADC mirrors.
    for i in 0..plane {
        assert!(
            (t[i] - d[i]).abs() < 1e-3,
            "pixel {i}: {} vs {}",
            t[i],
            d[i]
        );
        assert!((t[i] + a[i]).abs() < 1e-3, "pixel {i}");
    }
    for ch in [t, d, a] {
        let mean: f32 = ch.iter().sum::<f32>() / ch.len() as f32;
        let sd = (ch.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / ch.len() as f32).sqrt();
        assert!(mean.abs() < 1e-4 && (sd - 1.0).abs() < 1e-3, "{mean} {sd}");
    }
    // The largest ROI slice (5) is the middle one: its plane is centred between slices 4 and 6 in z.
    let middle = &t[256..512];
    let slice_mean = middle.iter().sum::<f32>() / 256.0;
    let below = t[..256].iter().sum::<f32>() / 256.0;
    let above = t[512..].iter().sum::<f32>() / 256.0;
    assert!(below < slice_mean && slice_mean < above);
}

#[test]
fn a_dicom_t2w_series_pairs_with_a_nifti_roi_through_ras() {
    let tmp = tempfile::tempdir().unwrap();
    let series = imaging().join("series_s0");
    let t2w = read_image(&series).unwrap();
    // A ROI on the T2W grid, written as NIfTI with the series' RAS affine.
    let mut roi = t2w.clone();
    roi.format = Format::Nifti;
    let (nx, ny) = (t2w.dims[0], t2w.dims[1]);
    roi.data = (0..t2w.voxels())
        .map(|i| {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            if z == 4 && (50..70).contains(&x) && (60..75).contains(&y) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    // DWI and ADC as NIfTI at half resolution over the same field of view.
    let mut coarse = t2w.affine;
    for row in coarse.iter_mut().take(3) {
        row[0] *= 2.0;
        row[1] *= 2.0;
    }
    let half = |sign: f64| {
        let mut v = volume([64, 64, 10], coarse, |w| sign * (w[0] + 2.0 * w[1]));
        v.spacing = vec![4.0, 4.0, t2w.spacing[2]];
        v
    };
    let dir = tmp.path().join("P0007");
    std::fs::create_dir_all(&dir).unwrap();
    write_nifti(&dir.join("roi.nii.gz"), &roi, StoreAs::Uint8).unwrap();
    write_nifti(&dir.join("dwi.nii.gz"), &half(1.0), StoreAs::Float32).unwrap();
    write_nifti(&dir.join("adc.nii.gz"), &half(-1.0), StoreAs::Float32).unwrap();
    let m = tmp.path().join("manifest.csv");
    std::fs::write(
        &m,
        format!(
            "patient_id,slm,sex,site,cea,ca199,t2w,dwi,adc,roi\nP0007,0,F,mid,3,20,{},P0007/dwi.nii.gz,P0007/adc.nii.gz,P0007/roi.nii.gz\n",
            series.display()
        ),
    )
    .unwrap();
    let manifest = Manifest::read(&m, &ClinicalCoding::default()).unwrap();
    let settings = PreprocessSettings {
        size: 8,
        neighbours: 0,
        margin: 0.0,
        ..PreprocessSettings::default()
    };
    let s = preprocess_patient(
        &manifest.patients[0],
        "center-b",
        &ClinicalCoding::default(),
        &settings,
    )
    .unwrap();
    assert_eq!(s.image.len(), 3 * 64);
    // DWI is x + 2y in RAS mm; on the LPS-derived T2W grid its z-scored pattern must be a plane too: DWI and
    // ADC mirror each other exactly, and the DWI values vary along both crop axes.
    let (d, a) = (&s.image[64..128], &s.image[128..]);
    for i in 0..64 {
        assert!((d[i] + a[i]).abs() < 1e-4);
    }
    assert!((d[0] - d[7]).abs() > 0.1 && (d[0] - d[56]).abs() > 0.1);

    // The same ROI shifted by 5 mm no longer lies on the T2W grid.
    roi.affine[0][3] += 5.0;
    write_nifti(&dir.join("roi.nii.gz"), &roi, StoreAs::Uint8).unwrap();
    let e = preprocess_patient(
        &manifest.patients[0],
        "center-b",
        &ClinicalCoding::default(),
        &settings,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("patient P0007: the ROI must lie on the T2W grid"),
        "{e}"
    );
}

#[test]
fn an_empty_roi_and_a_missing_image_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let a = affine([1.0, 1.0, 3.0], [0.0; 3]);
    let t2w = volume([16, 16, 4], a, linear);
    let empty = volume([16, 16, 4], a, |_| 0.0);
    let m = patient(tmp.path(), "P0042", &t2w, &t2w, &t2w, &empty);
    let e = preprocess_patient(
        &m.patients[0],
        "c",
        &ClinicalCoding::default(),
        &PreprocessSettings::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("patient P0042: the ROI (") && e.ends_with("roi.nii.gz) is empty"),
        "{e}"
    );
    let mut p = m.patients[0].clone();
    p.images.adc = None;
    let e = preprocess_patient(
        &p,
        "c",
        &ClinicalCoding::default(),
        &PreprocessSettings::default(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "patient P0042 has no adc image; image models need T2W, DWI, ADC and ROI"
    );
}

#[test]
fn the_cache_serves_a_second_run_and_misses_when_files_or_settings_change() {
    let tmp = tempfile::tempdir().unwrap();
    let a = affine([1.0, 1.0, 3.0], [0.0; 3]);
    let t2w = volume([32, 32, 8], a, linear);
    let roi = volume([32, 32, 8], a, blob(3));
    let m = patient(tmp.path(), "P0001", &t2w, &t2w, &t2w, &roi);
    let cache = tmp.path().join("cache");
    let s = PreprocessSettings {
        size: 12,
        ..PreprocessSettings::default()
    };
    let c = ClinicalCoding::default();
    let (first, src) = load_center(&m, "center-a", &c, &s, Some(&cache)).unwrap();
    assert_eq!(src, Source::Decoded);
    let (second, src) = load_center(&m, "center-a", &c, &s, Some(&cache)).unwrap();
    assert!(matches!(src, Source::Cache(_)), "{src:?}");
    assert_eq!(first, second);
    // Other settings: decoded again.
    let other = PreprocessSettings { margin: 0.4, ..s };
    assert_eq!(
        load_center(&m, "center-a", &c, &other, Some(&cache))
            .unwrap()
            .1,
        Source::Decoded
    );
    // A file's content changes: decoded again, with the new values.
    let brighter = volume([32, 32, 8], a, |w| linear(w) * linear(w));
    write_nifti(
        &tmp.path().join("P0001/t2w.nii.gz"),
        &brighter,
        StoreAs::Float32,
    )
    .unwrap();
    let (third, src) = load_center(&m, "center-a", &c, &s, Some(&cache)).unwrap();
    assert_eq!(src, Source::Decoded);
    assert_ne!(third[0].image, first[0].image);
    // A damaged cache file is rebuilt, not trusted.
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, bytes).unwrap();
    }
    assert_eq!(
        load_center(&m, "center-a", &c, &s, Some(&cache)).unwrap().1,
        Source::Decoded
    );
}

#[test]
fn empty_or_flat_volumes_are_refused_not_a_panic() {
    let a = affine([1.0, 1.0, 3.0], [0.0; 3]);
    let t2w = volume([16, 16, 4], a, linear);
    let roi = volume([16, 16, 4], a, blob(1));
    let empty = Volume {
        dims: vec![16, 0, 4],
        data: vec![],
        ..t2w.clone()
    };
    let flat = Volume {
        dims: vec![16, 16],
        ..t2w.clone()
    };
    for bad in [&empty, &flat] {
        let e = crop_volumes(
            "P9",
            "roi",
            [&t2w, bad, &t2w],
            &roi,
            &PreprocessSettings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("patient P9: the DWI image has dims"), "{e}");
    }
    assert!(crop_volumes(
        "P9",
        "roi",
        [&t2w, &t2w, &t2w],
        &roi,
        &PreprocessSettings::default()
    )
    .is_ok());
}

#[test]
fn a_fixed_field_of_view_keeps_the_tumour_size_and_smoothing_calms_the_noise() {
    let a = affine([1.0, 1.0, 3.0], [0.0; 3]);
    // A bright disc of radius r (mm) in every slice, on a checkerboard of noise-like texture.
    let disc = |r: f64| {
        move |w: [f64; 3]| {
            let (x, y) = (w[0] - 31.5, w[1] - 31.5);
            let checker = if (w[0] as i64 + w[1] as i64) % 2 == 0 {
                5.0
            } else {
                -5.0
            };
            if x * x + y * y <= r * r {
                200.0 + checker
            } else {
                100.0 + checker
            }
        }
    };
    let mask = |r: f64| {
        move |w: [f64; 3]| f64::from((w[0] - 31.5).powi(2) + (w[1] - 31.5).powi(2) <= r * r)
    };
    let crop = |r: f64, s: &PreprocessSettings| {
        let v = volume([64, 64, 4], a, disc(r));
        let roi = volume([64, 64, 4], a, mask(r));
        crop_volumes("P1", "roi", [&v, &v, &v], &roi, s).unwrap()
    };
    // Bright pixels of the T2W slice: the tumour's share of the crop.
    let share = |img: &[f32], size: usize| {
        img[..size * size].iter().filter(|&&v| v > 0.0).count() as f64 / (size * size) as f64
    };
    let boxed = PreprocessSettings {
        size: 32,
        neighbours: 0,
        ..PreprocessSettings::default()
    };
    let fixed = PreprocessSettings {
        fov_mm: 40.0,
        ..boxed
    };
    // Around the ROI's box every tumour fills the crop alike; in a fixed field of view a larger one fills
    // more of it.
    let (small, large) = (
        share(&crop(5.0, &boxed), 32),
        share(&crop(10.0, &boxed), 32),
    );
    assert!((small - large).abs() < 0.08, "{small} vs {large}");
    let (small, large) = (
        share(&crop(5.0, &fixed), 32),
        share(&crop(10.0, &fixed), 32),
    );
    assert!(large > 2.5 * small, "{small} vs {large}");
    // Smoothing takes the pixel-to-pixel checkerboard away.
    let roughness = |img: &[f32]| -> f64 {
        (0..31)
            .map(|i| f64::from((img[i] - img[i + 1]).abs()))
            .sum::<f64>()
            / 31.0
    };
    let smooth = PreprocessSettings {
        smooth_mm: 1.5,
        ..fixed
    };
    let (raw, calm) = (
        roughness(&crop(10.0, &fixed)),
        roughness(&crop(10.0, &smooth)),
    );
    assert!(calm < 0.3 * raw, "{calm} vs {raw}");
    // Each setting changes the settings the centres must share; unset, the canonical text is as before.
    assert_eq!(
        PreprocessSettings::default().canonical(),
        "fedslm-preprocess/1\nsize=64\nneighbours=1\nmargin=0.25\n"
    );
    assert!(fixed.canonical().ends_with("fov_mm=40.0\n"));
    assert!(smooth.canonical().contains("smooth_mm=1.5\n"));
}

#[test]
fn intensity_standardisation_undoes_a_scanner_s_monotone_contrast_curve() {
    let a = affine([1.0, 1.0, 3.0], [0.0; 3]);
    // The same anatomy (a smooth ramp) through two scanners: one linear, one with a contrast curve.
    let ramp = |w: [f64; 3]| 50.0 + w[0] + 2.0 * w[1];
    let curved = move |w: [f64; 3]| ramp(w).powi(2) / 100.0 + 3.0;
    let roi = volume([64, 64, 4], a, |w: [f64; 3]| {
        f64::from((w[0] - 31.5).powi(2) + (w[1] - 31.5).powi(2) <= 100.0)
    });
    let (linear, curve) = (volume([64, 64, 4], a, ramp), volume([64, 64, 4], a, curved));
    let plain = PreprocessSettings {
        size: 32,
        neighbours: 0,
        ..PreprocessSettings::default()
    };
    let even = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
    let scaled = PreprocessSettings {
        intensity_scale: Some(IntensityScale {
            t2w: even,
            dwi: even,
            adc: even,
        }),
        ..plain
    };
    let crop =
        |v: &Volume, s: &PreprocessSettings| crop_volumes("P1", "roi", [v, v, v], &roi, s).unwrap();
    let gap = |s: &PreprocessSettings| {
        crop(&linear, s)
            .iter()
            .zip(crop(&curve, s))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let (without, with) = (gap(&plain), gap(&scaled));
    assert!(with < 0.25 * without, "{with} vs {without}");
    // On the standard scale the crop's own landmarks are the scale's (before the z-score, which keeps them).
    let l = landmarks(&crop(&curve, &scaled)[..32 * 32]);
    for (got, want) in l.iter().zip(even) {
        assert!((got - want).abs() < 1e-3, "{l:?}");
    }
    // The scale is part of the settings the centres share.
    assert_ne!(scaled.canonical(), plain.canonical());
    assert!(scaled
        .canonical()
        .contains("intensity_scale.adc=[0.0, 0.1, 0.2,"));
}
