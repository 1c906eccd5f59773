"""Worklist triage: which studies a radiologist should read first.

Order:
1. **Positive calls**, highest calibrated probability first. These are the urgent findings.
2. **Referrals**: the model was uncertain, or the image was not assessable.
3. **The rest**, longest waiting first.

Within a tier, ties go to the study that has waited longer. Only positive calls show their probability:
for a referral it is uncertain, and for an image that is not assessable it is for research use only.

A study is all the predictions that share one (pseudonymised) Study Instance UID. An API upload with no DICOM
study is a study of its own. A study takes the most urgent tier of its images. Its probability is the highest
among its images in that tier, and its waiting time counts from its first image.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

POSITIVE, REFER, ROUTINE = 0, 1, 2
TIER_NAMES = {POSITIVE: "positive", REFER: "refer", ROUTINE: "routine"}


def tier(output: dict[str, Any]) -> int:
    """The triage tier of one prediction (its stored output)."""
    if output.get("positive") is True:
        return POSITIVE
    if output.get("refer") or output.get("in_domain") is False:
        return REFER
    return ROUTINE


def build(records: Iterable[Any], now: datetime | None = None) -> list[dict[str, Any]]:
    """Worklist entries, most urgent first, from audit records of predictions (``AuditRecord``)."""
    now = now or datetime.now(timezone.utc)
    studies: dict[str, dict[str, Any]] = {}
    for r in records:
        output = r.output if isinstance(r.output, dict) else {}
        dicom = r.dicom or {}
        key = dicom.get("StudyInstanceUID") or f"prediction:{r.request_id}"
        received = _parse(output.get("created") or r.time)
        t = tier(output)
        p = output.get("probability")
        entry = studies.setdefault(key, {"study": key, "tier": t, "probability": None, "received": received,
                                         "predictions": [], "modality": dicom.get("Modality")})
        entry["predictions"].append(r.request_id)
        entry["received"] = min(entry["received"], received)
        if t < entry["tier"]:
            entry["tier"], entry["probability"] = t, None
        if t == entry["tier"] == POSITIVE and p is not None:  # only a positive call's probability is shown
            entry["probability"] = max(entry["probability"] or 0.0, float(p))
        if t == entry["tier"] and t == REFER:
            entry.setdefault("reason", output.get("refer_reason"))
    items = sorted(studies.values(), key=lambda e: (
        e["tier"], -(e["probability"] or 0.0) if e["tier"] == POSITIVE else 0.0, e["received"]))
    for e in items:
        e["priority"] = TIER_NAMES[e.pop("tier")]
        e["waiting_s"] = round((now - e["received"]).total_seconds(), 1)
        e["received"] = e["received"].isoformat(timespec="seconds")
    return items


def _parse(text: str) -> datetime:
    value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
