"""A prediction as DICOM objects, made with highdicom: a Comprehensive SR and a Secondary Capture of the heat map.

Both go into the source image's study as new series, so any PACS viewer shows them beside the image.

**The SR** (Comprehensive SR IOD, document title LOINC 18748-4 "Diagnostic imaging report") says:
- the finding: SNOMED CT 233604007 "Pneumonia", valued Present (52101004), Absent (2667000) or, outside the
  model's validated domain, Indeterminate (82334004) with the reason in words;
- the calibrated probability and the operating threshold (the card's, chosen on validation);
- the refer-to-a-radiologist flag (Yes / No) and its reason;
- the algorithm: name, version, model id, weights hash and policy hash (DCM 111001 / 111003 / 111002);
- the observer is a device (medlens), and the text "not for diagnostic use".

The probability, threshold and refer concepts have no standard code, so they use the local coding scheme
``99MEDLENS``; DICOM allows local schemes whose designator starts with "99".

**The Secondary Capture** is the Grad-CAM overlay of the label shown, as RGB, with the disclaimer burned into
the pixels. A screenshot that leaves the PACS still says what it is.

**UIDs are derived, not random.** Each is a hash (pydicom ``generate_uid`` with entropy sources, under
pydicom's UID root) of
the source instance's SOP Instance UID, the model id, the policy hash and the object's role. So a retry, or a
restart after ``kill -9``, makes the same objects again. The PACS sees the same SOP Instance UID and stores it
once. The series UID is derived from the study, so all results of a study share one SR series and one SC series.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DISCLAIMER = "medlens research output - NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "medlens"
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002

FINDING = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
FINDINGS = Code("121070", "DCM", "Findings")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
PROBABILITY = Code("PROB", "99MEDLENS", "Calibrated probability of the finding")
THRESHOLD = Code("THRESH", "99MEDLENS", "Operating threshold")
REFER = Code("REFER", "99MEDLENS", "Refer to a radiologist")
REFER_REASON = Code("REFERWHY", "99MEDLENS", "Reason for referral")
NOT_ASSESSABLE = Code("NOTASSESS", "99MEDLENS", "Reason the image is not assessable")
DISCLAIMER_CODE = Code("DISCLAIM", "99MEDLENS", "Intended use")
NO_UNITS = Code("1", "UCUM", "no units")


def result_uid(source_sop_uid: str, card: Any, role: str) -> str:
    """A UID for one result object, the same every time for the same input, model and policy.

    ``role`` is "sr", "sc", "sr-series" or "sc-series"; the series roles are keyed by the study instead."""
    return generate_uid(entropy_srcs=["medlens", source_sop_uid, card.model_id, card.policy_hash, role])


def finding_value(result: dict[str, Any]) -> Code:
    """Present / Absent under the operating threshold, or Indeterminate when the input is not assessable."""
    if not result.get("in_domain", True) or result.get("positive") is None:
        return INDETERMINATE
    return PRESENT if result["positive"] else ABSENT


def make_sr(source: pydicom.Dataset, result: dict[str, Any], card: Any, *, version: str) -> pydicom.Dataset:
    """The Comprehensive SR of ``result`` (a :meth:`medlens.inference.Predictor.predict` result) for ``source``."""
    import highdicom as hd

    items: list[Any] = [hd.sr.CodeContentItem(FINDING, finding_value(result), relationship_type="CONTAINS")]
    if not result.get("in_domain", True):
        items.append(hd.sr.TextContentItem(NOT_ASSESSABLE, _text(result.get("domain_reason") or "outside the "
                                                                 "validated domain"), relationship_type="CONTAINS"))
    if result.get("probability") is not None:
        items.append(hd.sr.NumContentItem(PROBABILITY, float(result["probability"]), NO_UNITS,
                                          relationship_type="CONTAINS"))
    items.append(hd.sr.NumContentItem(THRESHOLD, float(result["threshold"]), NO_UNITS, relationship_type="CONTAINS"))
    refer = bool(result.get("refer"))
    items.append(hd.sr.CodeContentItem(REFER, YES if refer else NO, relationship_type="CONTAINS"))
    if refer and result.get("refer_reason"):
        items.append(hd.sr.TextContentItem(REFER_REASON, _text(result["refer_reason"]), relationship_type="CONTAINS"))
    findings = hd.sr.ContainerContentItem(FINDINGS, relationship_type="CONTAINS")
    findings.ContentSequence = hd.sr.ContentSequence(items, is_root=False)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["medlens-device", card.model_id]), name="medlens",
            manufacturer_name=MANUFACTURER, model_name=_text(card.model_id, 64)))
    root = hd.sr.ContainerContentItem(REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence([
        *observer,  # HAS OBS CONTEXT items
        findings,
        hd.sr.TextContentItem(ALGORITHM_NAME, "medlens", relationship_type="CONTAINS"),
        hd.sr.TextContentItem(ALGORITHM_VERSION, _text(version, 64), relationship_type="CONTAINS"),
        hd.sr.TextContentItem(ALGORITHM_PARAMETERS, _text(
            f"model_id={card.model_id}; weights_sha256={card.weights_sha256}; policy_hash={card.policy_hash}"),
            relationship_type="CONTAINS"),
        hd.sr.TextContentItem(DISCLAIMER_CODE, DISCLAIMER, relationship_type="CONTAINS"),
    ], is_root=False)
    study = str(source.StudyInstanceUID)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root,
        series_instance_uid=generate_uid(entropy_srcs=["medlens", study, card.model_id, card.policy_hash,
                                                       "sr-series"]),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(str(source.SOPInstanceUID), card, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER, is_complete=True,
        series_description="medlens AI result (not for diagnostic use)", transfer_syntax_uid=ExplicitVRLittleEndian)
    return drop_invalid_copied(sr)


def make_secondary_capture(source: pydicom.Dataset, picture: np.ndarray, card: Any) -> pydicom.Dataset:
    """The heat-map overlay ``picture`` (H, W, 3 uint8) as a Secondary Capture, the disclaimer burned in."""
    import highdicom as hd

    burned = burn_in(picture, DISCLAIMER)
    study = str(source.StudyInstanceUID)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=burned, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(entropy_srcs=["medlens", study, card.model_id, card.policy_hash,
                                                       "sc-series"]),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(str(source.SOPInstanceUID), card, "sc"),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"), series_description="medlens heat map (not for diagnostic use)",
        transfer_syntax_uid=ExplicitVRLittleEndian)
    if "Laterality" not in sc:  # General Series, type 2C: highdicom takes only L or R; a chest film has neither
        sc.Laterality = ""
    return drop_invalid_copied(sc)


def drop_invalid_copied(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Remove optional patient attributes that highdicom copied from the source but the source had wrong.
    A result must not repeat the modality's encoding error. For example, the SIIM file's Patient's Age is "62",
    not "062Y", and guessing its unit would invent data. Patient's Age, Size and Weight are type 3 in these IODs."""
    age = ds.get("PatientAge")
    if age is not None and not re.fullmatch(r"\d{3}[DWMY]", str(age)):
        del ds.PatientAge
    for keyword in ("PatientSize", "PatientWeight"):
        value = ds.get(keyword)
        if value is not None and value != "" and float(value) <= 0:  # "0" means not measured
            delattr(ds, keyword)
    return ds


def burn_in(picture: np.ndarray, text: str) -> np.ndarray:
    """``picture`` with ``text`` written in a black band along its top edge (Pillow's built-in font, scaled to
    the image width) so the disclaimer cannot be cropped away from the heat map without cutting the image."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = picture.shape[:2]
    size = max(10, width // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    band = size + size // 2
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture[..., :3]).astype(np.uint8), "RGB"), (0, band))
    ImageDraw.Draw(canvas).text((size // 2, size // 4), text, fill=(255, 255, 0), font=font)
    return np.asarray(canvas)


def _text(value: str, limit: int = 1024) -> str:
    """A text value within the VR's length (UT is long; the LO-based device fields take 64 characters)."""
    return str(value)[:limit]
