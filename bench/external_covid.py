"""Bar 4 of issue #8: external check on adult pneumonia (the COVID-19 images of ../shared/data/segmentation).

    python bench/external_covid.py [--run runs/domain-cxr_cpu] [--data ../shared/data/segmentation]

Builds a temporary CSV ``path,label,patient_id`` from the segmentation set's ``manifest.csv``: the images whose
``finding`` starts with COVID-19 labelled PNEUMONIA, the "No Finding" ones labelled NORMAL (the CSV needs both
classes; the figures that matter here are on the PNEUMONIA images), patient ids from ``patientid``. Copies the
run to a temporary folder (the run itself is never written) and runs ``medlens evaluate COPY --data CSV
--split test`` (a CSV without a split column that the run was not trained on: every row is evaluated). Writes
bench/results/external-covid.json: the share flagged out of domain, sensitivity on all images and on the
in-domain rest (patient-level bootstrap intervals), the silent-miss rate (a PNEUMONIA image called NORMAL, in
domain, not referred) with its Wilson interval, and the same counted again from predictions.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from medlens import rundir
from medlens.cli import main as medlens
from medlens.external import wilson
from medlens.models.card import jsonable

ROOT = Path(__file__).resolve().parents[1]


def build_csv(data: Path, dst: Path) -> dict[str, int]:
    rows, counts = [], {"PNEUMONIA": 0, "NORMAL": 0}
    with (data / "manifest.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            finding = r["finding"].strip()
            label = ("PNEUMONIA" if finding.startswith("COVID-19") else
                     "NORMAL" if finding.lower() == "no finding" else None)
            if label is None:
                continue
            counts[label] += 1
            rows.append([str((data / r["image"]).resolve()), label, f"covid-{r['patientid']}"])
    with dst.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(ROOT / "runs" / "domain-cxr_cpu"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "segmentation"))
    p.add_argument("--result", default=str(ROOT / "bench" / "results" / "external-covid.json"))
    p.add_argument("--bootstrap", default="1000")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="external-covid-") as tmp:
        tmp = Path(tmp)
        run = tmp / "external-cxr_cpu"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("eval", "*.db", "*.db-*"))
        counts = build_csv(Path(args.data), tmp / "covid.csv")
        t0 = time.perf_counter()
        rc = medlens(["evaluate", str(run), "--data", str(tmp / "covid.csv"), "--split", "test",
                      "--bootstrap", args.bootstrap, "--no-trust", "--no-progress"])
        wall = time.perf_counter() - t0
        if rc != 0:
            return rc
        out = rundir.eval_dir(run, "test")
        metrics = json.loads((out / "metrics.json").read_text())
        with (out / "predictions.csv").open(newline="") as f:
            preds = list(csv.DictReader(f))
    dom = metrics["domain"]
    pos = [r for r in preds if r["label"] == "1"]
    flagged = sum(r["in_domain"] == "0" for r in pos)
    silent = sum(r["predicted"] == "0" and r["in_domain"] == "1" and r["refer_final"] == "0" for r in pos)
    inside = dom["in_domain_metrics"] or {}
    result = {
        "written_by": "bench/external_covid.py",
        "run": str(Path(args.run).resolve().relative_to(ROOT)) if Path(args.run).resolve().is_relative_to(ROOT)
        else args.run,
        "data": f"{args.data} manifest.csv: finding COVID-19* -> PNEUMONIA, 'No Finding' -> NORMAL",
        "counts": counts, "patients": metrics["bootstrap"]["n_units"], "wall_s": round(wall, 1),
        "intended_use": dom["intended_use"],
        "score_threshold": dom["score_threshold"],
        "out_of_domain_all": dom["out_of_domain"],
        "out_of_domain_pneumonia": wilson(flagged, len(pos)),
        "sensitivity_all": metrics["sensitivity"],
        "sensitivity_in_domain": inside.get("sensitivity"),
        "in_domain_n": dom["in_domain_n"],
        "silent_miss": dom["silent_miss"],
        "silent_miss_recounted_from_predictions_csv": wilson(silent, len(pos)),
        "silent_error_all": dom["silent_error"],
        "referred_all": dom["referred"],
        "bootstrap": metrics["bootstrap"],
        "note": "sensitivity at the card's validation-chosen threshold; intervals: patient-level percentile "
                "bootstrap (sensitivity), Wilson (shares). The model was trained on paediatric Kermany X-rays.",
    }
    Path(args.result).write_text(json.dumps(jsonable(result), indent=1) + "\n")
    print(json.dumps(jsonable(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
