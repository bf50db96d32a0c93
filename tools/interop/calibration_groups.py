"""Hosmer-Lemeshow groups as R's ResourceSelection::hoslem.test cuts them, computed with numpy: breaks at
numpy.quantile(p, linspace(0, 1, g + 1)) (numpy's default 'linear' method is R's type 7), duplicates dropped,
each group closed on the right and the first also on the left. Reads {"cases": [{"label": [...], "prob":
[...]}], "g": G} on stdin; prints, per case, each group's count, observed positives and expected (summed
probabilities), and the statistic."""

import json
import sys

import numpy as np

request = json.load(sys.stdin)
g = request["g"]
out = []
for case in request["cases"]:
    y = np.asarray(case["label"], dtype=float)
    p = np.asarray(case["prob"], dtype=float)
    breaks = np.unique(np.quantile(p, np.linspace(0.0, 1.0, g + 1)))
    groups = max(len(breaks) - 1, 1)
    # Group k holds (b_k, b_k+1]: the number of inner breaks strictly below p.
    k = np.minimum(np.searchsorted(breaks[1:], p, side="left"), groups - 1)
    count = np.bincount(k, minlength=groups).astype(float)
    observed = np.bincount(k, weights=y, minlength=groups)
    expected = np.bincount(k, weights=p, minlength=groups)
    keep = count > 0
    var = expected[keep] * (1.0 - expected[keep] / count[keep])
    terms = np.where(var > 0, (observed[keep] - expected[keep]) ** 2 / np.where(var > 0, var, 1), 0.0)
    out.append(
        {
            "count": count.tolist(),
            "observed": observed.tolist(),
            "expected": expected.tolist(),
            "statistic": float(terms.sum()),
        }
    )
json.dump(out, sys.stdout)
