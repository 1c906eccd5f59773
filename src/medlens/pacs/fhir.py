"""A prediction as HL7 FHIR: a ``DiagnosticReport`` holding its ``Observation``, built and validated with the
fhir.resources models.

fhir.resources 8 ships R5 as its default and R4B (FHIR 4.3) as the R4 line. R4B's DiagnosticReport and
Observation are the R4 resources for every element used here, so these models are used.

The Observation:
- code: SNOMED CT 233604007 "Pneumonia";
- value: Present / Absent at the operating threshold. An image that is not assessable has no value: its
  ``dataAbsentReason`` is "not-performed" and its note gives the reason;
- components: the calibrated probability (left out when the image is not assessable), the threshold, and the
  refer flag;
- status: "preliminary". No one has verified it: it is the output of an algorithm, not a report.

The report carries no patient. The audit trail is de-identified, so the integration engine links the report
to the patient and the study through its identifier, the prediction id.
"""

from __future__ import annotations

from typing import Any

SNOMED, UCUM, LOINC = "http://snomed.info/sct", "http://unitsofmeasure.org", "http://loinc.org"
MEDLENS_CODES = "urn:medlens:concept"
PREDICTION_IDS = "urn:medlens:prediction"
DISCLAIMER = "Produced by medlens, an AI research tool. Not for diagnostic use; a clinician must verify it."


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def diagnostic_report(output: dict[str, Any], record: Any) -> Any:
    """The validated R4B ``DiagnosticReport`` (with a contained ``Observation``) of one stored prediction.

    ``output`` is the prediction as served by ``GET /v1/predictions/{id}``; ``record`` its audit record."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    pid = output.get("id") or record.request_id
    issued = output.get("created") or record.time
    assessable = output.get("in_domain", True) is not False and output.get("positive") is not None
    device = {"display": f"medlens model {record.model_id} (policy {record.policy_hash})"}
    components = [{"code": _cc(MEDLENS_CODES, "THRESH", "Operating threshold"),
                   "valueQuantity": {"value": float(output["threshold"]), "unit": "1", "system": UCUM, "code": "1"}},
                  {"code": _cc(MEDLENS_CODES, "REFER", "Refer to a radiologist"),
                   "valueBoolean": bool(output.get("refer"))}]
    notes = [{"text": DISCLAIMER}]
    if output.get("refer") and output.get("refer_reason"):
        notes.append({"text": f"Referral: {output['refer_reason']}"})
    observation: dict[str, Any] = {
        "resourceType": "Observation", "id": "finding", "status": "preliminary",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")],
        "code": _cc(SNOMED, "233604007", "Pneumonia"), "issued": issued, "device": device,
        "identifier": [{"system": PREDICTION_IDS, "value": pid}], "note": notes, "component": components,
    }
    if assessable:
        observation["valueCodeableConcept"] = (_cc(SNOMED, "52101004", "Present") if output["positive"]
                                               else _cc(SNOMED, "2667000", "Absent"))
        components.insert(0, {"code": _cc(MEDLENS_CODES, "PROB", "Calibrated probability of pneumonia"),
                              "valueQuantity": {"value": float(output["probability"]), "unit": "1", "system": UCUM,
                                                "code": "1"}})
        conclusion = f"Pneumonia {'present' if output['positive'] else 'absent'} (AI, preliminary)"
    else:
        observation["dataAbsentReason"] = _cc("http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                              "not-performed", "Not Performed")
        notes.append({"text": f"Not assessable: {output.get('domain_reason') or 'outside the validated domain'}"})
        conclusion = "Not assessable by the AI model: read by a radiologist"
    report = DiagnosticReport.model_validate({
        "resourceType": "DiagnosticReport", "id": pid, "status": "preliminary",
        "identifier": [{"system": PREDICTION_IDS, "value": pid}],
        "category": [_cc("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": _cc(LOINC, "18748-4", "Diagnostic imaging study"), "issued": issued,
        "contained": [Observation.model_validate(observation)], "result": [{"reference": "#finding"}],
        "conclusion": f"{conclusion}. {DISCLAIMER}",
    })
    return report
