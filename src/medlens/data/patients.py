"""Patient ids: how every sample found by ``medlens.data.sources.discover`` gets one.

A classifier must be validated on patients it has never seen, so every sample gets a patient id:

1. ``patient_pattern`` (a regex with a group named ``patient`` or one group), searched in the file's
   path relative to the data root (e.g. ``train/NORMAL/IM-0115-0001.jpeg``); it must match every file.
2. Otherwise the Kermany chest X-ray names are recognised:

   * ``personN_bacteria_M`` -> ``"personN_bacteria"``, ``personN_virus_M`` -> ``"personN_virus"``
     (and ``meta["subtype"]``). The person number is counted separately for bacterial and viral
     cases: in the shared copy of the data set images of ``person1_bacteria`` and ``person1_virus``
     are no more alike than random pairs, while images of one ``personN_bacteria`` are, and the official
     train/test split shares 170 person numbers between train and test but always with the other
     subtype. Treating the number alone as the patient would merge unrelated children and make the
     official split look leaky; the subtype is therefore part of the patient id.
   * ``NORMAL2-IM-XXXX-YYYY`` -> ``"normal2-XXXX"``, ``IM-XXXX-YYYY`` -> ``"im-XXXX"`` (numbered
     separately for the two prefixes).
3. DICOM files: the PatientID element, pseudonymised as ``dicom-<sha256 prefix>`` so that no patient id is
   written in clear into a run's split.json.
4. Otherwise (or for a CSV, when there is a ``patient_id`` column, that column) the file itself: each
   image is its own patient. ``SampleTable.patient_id_source`` says which rule was used and
   ``SampleTable.notes`` warns when ids are per file (a split can then leak a patient's other images).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from medlens.errors import ConfigError, DataError

__all__ = ["PatientNamer", "finish_patients", "kermany_patient"]

# Kermany et al. 2018 file names (see module docstring for why the subtype is part of the patient id).
_KERMANY_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^person(\d+)_(bacteria|virus)_\d+", re.IGNORECASE), "person"),
    (re.compile(r"^NORMAL2-IM-(\d+)-\d+", re.IGNORECASE), "normal2"),
    (re.compile(r"^IM-(\d+)-\d+", re.IGNORECASE), "im"),
]


def _compile_pattern(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"patient pattern {pattern!r} is not a valid regular expression: {e}") from None
    if "patient" not in rx.groupindex and rx.groups < 1:
        raise ConfigError(
            f"patient pattern {pattern!r} has no group: mark the patient id with (?P<patient>...) or (...)"
        )
    return rx


def kermany_patient(name: str) -> tuple[str, dict] | None:
    """Patient id and meta from a Kermany file name (``person12_virus_34.jpeg``), or None."""
    stem = Path(name).name
    for rx, kind in _KERMANY_PATTERNS:
        m = rx.match(stem)
        if m is None:
            continue
        number = m.group(1)
        if kind == "person":
            subtype = m.group(2).lower()
            return f"person{number}_{subtype}", {"subtype": subtype}
        return f"{kind}-{number}", {}
    return None


class PatientNamer:
    """Gives each file a patient id and records which rule was used."""

    def __init__(self, pattern: str | None):
        self.rx = _compile_pattern(pattern)
        self.pattern = pattern
        self.used: Counter = Counter()
        self.unmatched: list[str] = []

    def __call__(self, rel: str, path: Path | None = None) -> tuple[str, dict]:
        if self.rx is not None:
            m = self.rx.search(rel)
            if m is None:
                self.unmatched.append(rel)
                return rel, {}
            pid = m.group("patient") if "patient" in self.rx.groupindex else m.group(1)
            self.used["pattern"] += 1
            return pid, {}
        found = kermany_patient(rel)
        if found is not None:
            self.used["filename"] += 1
            return found
        pid = _dicom_patient(path) if path is not None and path.suffix.lower() in (".dcm", ".dicom") else None
        if pid is not None:
            self.used["dicom"] += 1
            return pid, {}
        self.used["per-file"] += 1
        return _per_file_id(rel), {}

    def check(self, where: str) -> None:
        if self.unmatched:
            n = len(self.unmatched)
            raise DataError(
                f"patient pattern {self.pattern!r} matched no patient id in {n} file(s) of {where}, "
                f"e.g. {', '.join(self.unmatched[:3])}",
                hint="the pattern is searched in each path relative to the data root; fix the pattern "
                "or leave it out to use the file names",
            )


def _dicom_patient(path: Path) -> str | None:
    """A DICOM file's PatientID, pseudonymised: run folders (split.json) must not carry patient ids in clear,
    so the id is replaced by a stable hash that still groups a patient's images."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # unreadable headers are reported by the reader at decode time
        return None
    pid = str(getattr(ds, "PatientID", "") or "").strip()
    return f"dicom-{hashlib.sha256(pid.encode()).hexdigest()[:16]}" if pid else None


def _per_file_id(rel: str) -> str:
    """Patient id of a file with no known patient: its relative path without suffix (unique per file)."""
    p = Path(rel)
    return p.with_suffix("").as_posix() if p.suffix else p.as_posix()


def finish_patients(table_kwargs: dict, used: Counter, n: int) -> None:
    kinds = [k for k in ("column", "pattern", "filename", "dicom", "per-file") if used.get(k)]
    table_kwargs["patient_id_source"] = kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "")
    table_kwargs["patients_per_file"] = bool(used.get("per-file"))
    if used.get("per-file"):
        k = used["per-file"]
        table_kwargs["notes"].append(
            f"no patient id found for {k} of {n} images: each of them counts as its own patient, so a "
            "patient with several images can end up in both train and validation; give a patient_pattern "
            "or a CSV with a patient_id column"
        )
