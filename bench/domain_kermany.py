"""Issue 8's out-of-domain bar on Kermany: does the model refuse what it was not built for?

    python bench/domain_kermany.py --run runs/chest_xray-cxr_cpu --work runs/domain-cxr_cpu \
        --data ../shared/data/chest_xray --shared ../shared/data

``--run`` is a trained run (default recipe); it is copied to ``--work`` and never changed. When the copy's card
has no learned in-domain score (runs trained before ``medlens.domain``), ``medlens recalibrate WORK DATA`` fits
it on the run's own training images and held-apart validation half, without retraining (it also refits the
temperature, threshold and referral policy on the same validation halves: same weights, same data, same values).

The out-of-domain set is the test fixture (``tests/helpers.ood_fixture``): the real CT and MR DICOM files,
BreastMNIST ultrasound (28 px as stored, and upscaled to 224 px), synthetic blank / white / near-constant /
noise / 1 px / 40 px images and a smooth ramp ("non-radiograph inputs"), plus inverted and 90-degree-rotated
Kermany test X-rays (reported apart: radiographs, wrongly presented). It is compared with the 624 Kermany test
images, which are only predicted: nothing is chosen on them.

Reports: AUROC of the learned score (Mahalanobis distance) for non-radiographs vs Kermany test, and for all
out-of-domain inputs; the share of each kind flagged (any gate) and flagged by the learned score alone; the
share of Kermany test images flagged, with the reasons. Writes bench/results/domain-kermany.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
NON_RADIOGRAPH = ("dicom", "breast", "breast_224", "synthetic_content", "gradient")


def _share(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(ROOT / "runs" / "chest_xray-cxr_cpu"))
    p.add_argument("--work", default=str(ROOT / "runs" / "domain-cxr_cpu"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--result", default=str(ROOT / "bench" / "results" / "domain-kermany.json"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import ood_fixture  # the test fixture itself, so the bench measures what the tests build

    from medlens.inference import Predictor
    from medlens.train import recalibrate

    t0 = time.perf_counter()
    work = Path(args.work)
    if not (work / "model.card.json").exists():
        shutil.copytree(args.run, work, symlinks=True)
    fitted_here = False
    if not json.loads((work / "model.card.json").read_text()).get("domain", {}).get("score"):
        recalibrate(work, args.data, progress=False)
        fitted_here = True
    fit_s = time.perf_counter() - t0
    predictor = Predictor.from_run(work)
    score = predictor.card.domain["score"]

    with tempfile.TemporaryDirectory(prefix="medlens-ood-") as tmp:
        kinds = ood_fixture(Path(args.shared), Path(tmp))
        ood = {kind: predictor.predict(paths) for kind, paths in kinds.items()}
    test_paths = sorted(Path(args.data, "test").glob("*/*"))
    t1 = time.perf_counter()
    kermany = predictor.predict(test_paths)
    predict_s = time.perf_counter() - t1

    threshold = float(score["threshold"])
    test_scores = [r["domain_score"] for r in kermany]

    def auroc(results: list[dict]) -> float:
        s = [r["domain_score"] for r in results]
        return round(float(roc_auc_score([1] * len(s) + [0] * len(test_scores), s + test_scores)), 4)

    non_radio = [r for k in NON_RADIOGRAPH for r in ood.get(k, [])]
    everything = [r for rs in ood.values() for r in rs]
    per_kind = {k: {"n": len(rs), "flagged": _share([not r["in_domain"] for r in rs]),
                    "flagged_by_learned_score": _share([r["domain_score"] > threshold for r in rs]),
                    "domain_score_median": round(float(np.median([r["domain_score"] for r in rs])), 2),
                    "reasons": sorted({r["domain_reason"].split(" (")[0] for r in rs if r["domain_reason"]})}
                for k, rs in ood.items()}
    result = {
        "benchmark": "domain_kermany", "written_by": "bench/domain_kermany.py",
        "run": args.run, "work": str(work), "data": args.data, "model_id": predictor.card.model_id,
        "policy_hash": predictor.card.policy_hash, "score_fitted_by_this_script": fitted_here,
        "learned_score": {k: score[k] for k in ("method", "threshold", "coverage", "dim", "n_train", "n_val",
                                                "shrinkage", "data", "features")},
        "kermany_test": {
            "n": len(kermany), "flagged": _share([not r["in_domain"] for r in kermany]),
            "flagged_by_learned_score": _share([s > threshold for s in test_scores]),
            "reasons": dict(Counter(r["domain_reason"].split(" (")[0] for r in kermany if r["domain_reason"])),
            "domain_score_percentiles": {q: round(float(np.percentile(test_scores, q)), 2) for q in (50, 90, 99)}},
        "non_radiograph": {"n": len(non_radio), "flagged": _share([not r["in_domain"] for r in non_radio]),
                           "flagged_by_learned_score": _share([r["domain_score"] > threshold for r in non_radio]),
                           "auroc_learned_score_vs_kermany_test": auroc(non_radio)},
        "all_ood": {"n": len(everything), "flagged": _share([not r["in_domain"] for r in everything]),
                    "auroc_learned_score_vs_kermany_test": auroc(everything)},
        "by_kind": per_kind,
        "bars": {"auroc >= 0.99": None, "non-radiographs flagged = 100%": None, "kermany test flagged <= 3%": None},
        "seconds": {"fit": round(fit_s, 1), "predict_kermany_test": round(predict_s, 1)},
        "device": predictor.device.type, "platform": platform.platform(), "python": platform.python_version(),
    }
    result["bars"] = {"auroc >= 0.99": result["non_radiograph"]["auroc_learned_score_vs_kermany_test"] >= 0.99,
                      "non-radiographs flagged = 100%": result["non_radiograph"]["flagged"] == 1.0,
                      "kermany test flagged <= 3%": result["kermany_test"]["flagged"] <= 0.03}
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("kermany_test", "non_radiograph", "all_ood", "bars")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
