//! `fedslm inspect`: what an image file, a DICOM series or a manifest holds.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedslm_cohort::{read_image, ClinicalCoding, CohortSummary, Manifest, MissingPolicy};
use serde_json::json;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A NIfTI file (.nii, .nii.gz), a DICOM file, a DICOM series folder, or a cohort's manifest.csv.
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// For a manifest: what to do with a missing CEA or CA19-9 (error, exclude, normal).
    #[arg(long, default_value = "error", value_parser = ["error", "exclude", "normal"])]
    missing: String,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let is_manifest = args
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_manifest {
        let coding = ClinicalCoding {
            missing: match args.missing.as_str() {
                "exclude" => MissingPolicy::Exclude,
                "normal" => MissingPolicy::Normal,
                _ => MissingPolicy::Error,
            },
            ..ClinicalCoding::default()
        };
        let manifest = Manifest::read(&args.path, &coding)?;
        let summary = CohortSummary::of(&manifest, &coding);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!("{}", args.path.display());
            print!("{summary}");
        }
        return Ok(());
    }
    let volume = read_image(&args.path)
        .with_context(|| format!("cannot inspect {}", args.path.display()))?;
    let s = volume.stats();
    if args.json {
        let spacing = if volume.spacing.is_empty() {
            serde_json::Value::Null
        } else {
            json!(volume.spacing)
        };
        let out = json!({
            "format": volume.format.name(),
            "dims": volume.dims,
            "spacing": spacing,
            "dtype": volume.dtype,
            "min": s.min,
            "max": s.max,
            "mean": s.mean,
            "sum": s.sum,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(" x ")
    };
    println!("{}", args.path.display());
    println!("format   {}", volume.format.name());
    println!(
        "dims     {}",
        volume
            .dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" x ")
    );
    if volume.spacing.is_empty() {
        println!("spacing  (not given)");
    } else {
        println!("spacing  {}", list(&volume.spacing));
    }
    println!("dtype    {}", volume.dtype);
    println!(
        "values   min {}, max {}, mean {}, sum {}",
        s.min, s.max, s.mean, s.sum
    );
    Ok(())
}
