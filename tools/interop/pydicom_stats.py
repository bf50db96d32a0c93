#!/usr/bin/env python3
"""Statistics of every greyscale DICOM file in pydicom's own test data, as pydicom reads them: the live
cross-check of fedslm's DICOM reader on real files beyond shared/reference (tests/pydicom_crosscheck.rs).

Prints a JSON list: {"path", "dims", "min", "max", "sum"} per file pydicom decodes (with RescaleSlope and
RescaleIntercept applied where present), or {"path", "skip"} for files that are not greyscale images.
"""
import glob
import json
import os
import warnings

import numpy as np
import pydicom
from pydicom.pixels import apply_rescale

warnings.simplefilter("ignore")
folder = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
out = []
for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds or ds.get("SamplesPerPixel", 1) != 1:
            out.append({"path": path, "skip": "no greyscale pixel data"})
            continue
        arr = ds.pixel_array
    except Exception as e:  # pydicom cannot read it either: not a case for comparison
        out.append({"path": path, "skip": f"pydicom: {type(e).__name__}"})
        continue
    if "RescaleSlope" in ds:
        arr = apply_rescale(arr, ds)
    arr = np.asarray(arr, dtype=np.float64)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out.append({
        "path": path,
        "dims": [int(ds.Columns), int(ds.Rows), frames],
        "min": float(arr.min()),
        "max": float(arr.max()),
        "sum": float(arr.sum()),
    })
print(json.dumps(out))
