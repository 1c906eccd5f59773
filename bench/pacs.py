"""Issue 11's PACS loop, measured against a real Orthanc: seconds from send to results, and a destination outage.

    python bench/pacs.py --run runs/cxr_cpu [--rounds 5] [--outage 30] [--result bench/results/pacs-cpu.json]

Uses the test suite's harness (tests/pacs_harness.py): Debian's Orthanc on throwaway loopback ports, dcmtk's
storescu, and ``medlens dicom listen`` as a subprocess.

1. **Latency** (``--rounds`` rounds). Each round sends every file of ``--dicom`` (default the shared chest CRs,
   CT and MR) to Orthanc with storescu, routes each study to the node through Orthanc's REST API
   (``/modalities/medlens/store``, as a PACS administrator's routing rule would), and polls Orthanc until the
   study holds its SR (and, for a chest CR, its heat-map Secondary Capture). It records seconds from the
   storescu call to the results being in Orthanc. Between rounds the studies are deleted from Orthanc.
2. **Outage**. Orthanc is stopped. The chest CRs are sent straight to the node, which is killed with SIGKILL
   while the destination is down and then restarted. Orthanc stays down for ``--outage`` seconds in all, then
   comes back. It records seconds from its return until every result is in, and whether each result is there
   exactly once.

Writes the JSON (every figure, the machine, the command, the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's PACS harness


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--dicom", type=Path, default=ROOT.parent / "shared" / "data" / "dicom")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--outage", type=float, default=30.0, help="seconds the destination is down")
    p.add_argument("--result", type=Path, default=ROOT / "bench" / "results" / "pacs-cpu.json")
    args = p.parse_args(argv)
    import pydicom
    from pacs_harness import Node, Orthanc, free_port, result_series, send_to_node, wait_for

    files = sorted(args.dicom.glob("*.dcm"))
    modality = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        modality[str(ds.StudyInstanceUID)] = str(ds.Modality)
    want = {uid: ({"SR", "OT"} if m in ("CR", "DX") else {"SR"}) for uid, m in modality.items()}
    started = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "pacs", "written_by": "bench/pacs.py", "command": " ".join(["python", "bench/pacs.py", *(argv or
                                                                                                  sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance(),
        "device": {"cpu": platform.processor() or platform.machine(),
                   "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                   "platform": platform.platform()},
        "run": str(args.run), "files": {f.name: modality[str(pydicom.dcmread(f, stop_before_pixels=True)
                                                            .StudyInstanceUID)] for f in files},
    }
    with tempfile.TemporaryDirectory(prefix="medlens-pacs-bench-") as tmp:
        root = Path(tmp)
        # 1. latency
        node_port = free_port()
        orthanc = Orthanc(root / "orthanc", node_port).start()
        node = Node(args.run.resolve(), root / "node", orthanc.destination, port=node_port).start()
        samples: list[dict[str, Any]] = []
        try:
            for r in range(args.rounds):
                for study in orthanc.get("/studies"):
                    orthanc.delete(f"/studies/{study}")
                for f in files:
                    t0 = time.perf_counter()
                    orthanc.store([f])
                    uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                    sid = next(s["ID"] for s in orthanc.studies() if s["MainDicomTags"]["StudyInstanceUID"] == uid)
                    orthanc.post("/modalities/medlens/store", sid)
                    counts = wait_for(lambda s=sid, w=want[uid]: (c := result_series(orthanc, s)) and w <= set(c) and c,
                                      300, f"results of {uid}", interval=0.05)
                    samples.append({"round": r + 1, "file": f.name, "modality": modality[uid],
                                    "seconds": round(time.perf_counter() - t0, 3), "series": counts})
                    print(f"round {r + 1} {f.name[:40]:40s} {modality[uid]}: {samples[-1]['seconds']:.2f} s {counts}")
        finally:
            node.stop()
            orthanc.stop()
        secs = [s["seconds"] for s in samples]
        result["latency"] = {"samples": samples, "n": len(secs), "p50_s": round(statistics.median(secs), 3),
                             "max_s": round(max(secs), 3),
                             "by_modality": {m: {"p50_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)}
                                             for m in sorted({s["modality"] for s in samples})
                                             for v in [[s["seconds"] for s in samples if s["modality"] == m]]},
                             "exactly_one_each": all(set(s["series"].values()) == {1} for s in samples)}
        # 2. outage + kill -9
        node_port = free_port()
        orthanc = Orthanc(root / "orthanc-down", node_port)
        node = Node(args.run.resolve(), root / "node-down", orthanc.destination, port=node_port).start()
        chest = [f for f in files if modality[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)]
                 in ("CR", "DX")]
        try:
            down_at = time.perf_counter()
            send_to_node(chest, node.port)
            wait_for(lambda: node.log().count("processed") >= len(chest), 120, "processing while the PACS is down")
            node.kill()
            node.start()
            time.sleep(max(0.0, args.outage - (time.perf_counter() - down_at)))
            down_for = time.perf_counter() - down_at
            orthanc.start()
            back = time.perf_counter()
            arrived = {}
            for f in chest:
                uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                sid = wait_for(lambda u=uid: next((s["ID"] for s in orthanc.studies()
                                                   if s["MainDicomTags"]["StudyInstanceUID"] == u), None), 300, uid)
                arrived[f.name] = wait_for(lambda s=sid: (c := result_series(orthanc, s)) and {"SR", "OT"} <= set(c)
                                           and c, 300, f"results of {uid}")
            all_in = time.perf_counter() - back
        finally:
            node.stop()
            orthanc.stop()
        result["outage"] = {"destination_down_s": round(down_for, 1), "node_killed_with_sigkill": True,
                            "results_in_after_back_s": round(all_in, 2), "series": arrived,
                            "exactly_once": all(c == {"SR": 1, "OT": 1} for c in arrived.values())}
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency"]
    print(f"send -> results in Orthanc: p50 {lat['p50_s']:.2f} s, max {lat['max_s']:.2f} s over {lat['n']} sends; "
          f"by modality {lat['by_modality']}")
    print(f"outage {result['outage']['destination_down_s']} s with kill -9: all results "
          f"{result['outage']['results_in_after_back_s']} s after the PACS came back; exactly once: "
          f"{result['outage']['exactly_once']}")
    print(f"wrote {args.result}")
    return 0


def provenance() -> dict[str, Any]:
    def git(*a: str) -> str | None:
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "src", "bench/pacs.py", "tests/pacs_harness.py")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": None if changed is None else bool(changed)}


if __name__ == "__main__":
    sys.exit(main())
