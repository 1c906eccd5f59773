"""De-identification of DICOM fields: what the audit trail and the API may keep of a DICOM header.

:func:`deidentify_dicom_fields` keeps an allow-list of technical fields (modality, body part, view, image size,
...) in clear, replaces patient and study identifiers by keyed HMAC-SHA256 pseudonyms (:func:`keyed_hash`: the
same value under the same key gives the same pseudonym, so studies still link up), reduces ``StudyDate`` to
its year, pools ages of 90 and over, and drops every other field. :func:`dicom_fields` reads the fields it
looks at from a pydicom ``Dataset``. The key is the service's ``audit_key`` (see
:mod:`medlens.service.settings`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

HASH_PREFIX = "hmac-sha256:"
_HASHED_VALUE = re.compile(re.escape(HASH_PREFIX) + r"[0-9a-f]{64}")

# Identifiers: replaced by keyed pseudonyms (same value + same key = same pseudonym, so studies still link up).
HASHED_FIELDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "IssuerOfPatientID",
    "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
)
# Technical fields with no patient in them: kept in clear (short values only).
KEPT_FIELDS: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "Laterality", "ImageLaterality", "PatientSex",
    "PhotometricInterpretation", "Rows", "Columns", "BitsStored", "NumberOfFrames", "SOPClassUID",
    "TransferSyntaxUID", "Manufacturer", "ManufacturerModelName",
    # medlens.data.dicom.read_dicom's technical metadata
    "format", "shape", "bits", "photometric", "transfer_syntax", "transfer_syntax_name", "window", "voi", "frames",
)
# read_dicom's metadata names -> DICOM keywords
ALIASES: dict[str, str] = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID", "modality": "Modality"}
_MAX_KEPT_CHARS = 64


def keyed_hash(field: str, value: str, key: bytes) -> str:
    """``hmac-sha256:<hex>`` of a field's value; the field name is mixed in, so equal values in different
    fields (SIIM files have PatientName == PatientID) do not get equal pseudonyms."""
    digest = hmac.new(key, field.encode("utf-8") + b"\x00" + value.encode("utf-8"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest


def dicom_fields(ds: Any) -> dict[str, Any]:
    """The fields :func:`deidentify_dicom_fields` looks at, read from a pydicom ``Dataset``."""
    out: dict[str, Any] = {}
    for keyword in (*HASHED_FIELDS, *KEPT_FIELDS, "StudyDate", "PatientAge"):
        if keyword[0].isupper() and keyword in ds:
            out[keyword] = ds.get(keyword)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        out["TransferSyntaxUID"] = str(file_meta.TransferSyntaxUID)
    return out


def deidentify_dicom_fields(meta: Mapping[str, Any] | Any, key: bytes) -> dict[str, Any]:
    """De-identified DICOM fields, safe to store: nothing that names or dates the patient stays in clear.

    ``meta`` maps DICOM keywords (``PatientName``, ``Modality``, ...) or read_dicom's names (``patient_id``,
    ``study_uid``) to values; a pydicom ``Dataset`` works too. Identifiers (:data:`HASHED_FIELDS`) become
    :func:`keyed_hash` pseudonyms, ``StudyDate`` becomes ``StudyYear``, ``PatientAge`` is kept below 90 years
    (``090Y+`` above, as HIPAA's safe harbour asks), the technical :data:`KEPT_FIELDS` stay, and everything
    else is dropped. Empty values are left out. Applying it twice gives the same result.
    """
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise ValueError("the de-identification key must be at least 16 bytes")
    if not isinstance(meta, Mapping):
        meta = dicom_fields(meta)
    out: dict[str, Any] = {}
    for raw_name, value in meta.items():
        name = ALIASES.get(raw_name, raw_name)
        if name in HASHED_FIELDS:
            text = _as_text(value)
            if text:
                out[name] = text if _HASHED_VALUE.fullmatch(text) else keyed_hash(name, text, bytes(key))
        elif name == "StudyDate":
            year = _as_text(value)[:4]
            if re.fullmatch(r"\d{4}", year):
                out["StudyYear"] = year
        elif name == "StudyYear":
            if re.fullmatch(r"\d{4}", _as_text(value)):
                out["StudyYear"] = _as_text(value)
        elif name == "PatientAge":
            age = _age(_as_text(value))
            if age:
                out["PatientAge"] = age
        elif name in KEPT_FIELDS:
            plain = _plain(value)
            if plain not in (None, "", []):
                out[name] = plain
    return dict(sorted(out.items()))


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a kept value; long text is cut (a technical field holds no free text)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return str(value).strip()[:_MAX_KEPT_CHARS]


def _age(text: str) -> str:
    """A DICOM age string (``062Y``, ``003M``), with ages of 90 years and over pooled as ``090Y+``."""
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text.upper())
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2) or "Y"
    if unit == "Y" and number >= 90:
        return "090Y+"
    return f"{number:03d}{unit}"
