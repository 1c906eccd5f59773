"""The API's request and response models (pydantic): what ``/openapi.json`` and ``/docs`` describe.

Also the OpenAPI fragments the routes share: :func:`error_responses` (the documented error statuses of an
endpoint) and :data:`MULTIPART_BODY` (the upload form of ``POST /v1/predictions``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from medlens.service.audit import AuditRecord
from medlens.uncertainty import UNCERTAINTY_METHODS

UncertaintyMethod = Literal[UNCERTAINTY_METHODS]  # the one list of method names (medlens.uncertainty)
PredictionId = Annotated[str, PathParam(max_length=128, description="the prediction id (a UUID)")]


class ErrorResponse(BaseModel):
    """Every error: one sentence that says what was wrong and, where it helps, what to do."""

    detail: str = Field(description="what went wrong, in words", examples=["missing API key"])


class Uncertainty(BaseModel):
    method: UncertaintyMethod = Field(description="how the uncertainty was estimated")
    predictive_entropy: float = Field(description="entropy of the mean predictive distribution (nats), centred "
                                                  "on p = 0.5")
    decision_entropy: float = Field(description="entropy of the call at the operating threshold (nats): the "
                                                "probability shifted in logit space so the threshold sits at 0.5; "
                                                "the referral measure")
    mutual_information: float = Field(description="epistemic part of the entropy (nats); 0 for softmax")
    variance: float = Field(description="variance of the positive-class probability over the passes")
    passes: int = Field(description="stochastic passes (1 for softmax)")


class InputInfo(BaseModel):
    sha256: str = Field(description="SHA-256 of the uploaded file's bytes")
    format: str = Field(description="png, jpeg or dicom")
    width: int
    height: int
    bytes: int = Field(description="size of the uploaded file")
    dicom: dict[str, Any] | None = Field(
        None, description="de-identified DICOM fields (technical fields in clear, identifiers as keyed hashes)")


class Prediction(BaseModel):
    """One prediction; also what ``GET /v1/predictions/{id}`` returns later, from the audit trail."""

    id: str = Field(description="request id (UUID): the prediction's id and the X-Request-ID header")
    created: str = Field(description="UTC time, ISO 8601")
    probability: float | None = Field(ge=0, le=1, description="calibrated probability of the positive class; null "
                                                              "only for an image the DICOM node received but "
                                                              "could not read (its SR says not assessable)")
    positive_class: str = Field(description="the class the probability is for")
    label: str | None = Field(description="the label at the model's operating threshold; null when the input is "
                                          "not assessable (in_domain false)")
    positive: bool | None = Field(description="probability >= threshold; null when the input is not assessable")
    threshold: float = Field(description="the operating threshold chosen on validation data")
    uncertainty: Uncertainty
    refer: bool | None = Field(description="refer to a radiologist (uncertainty above the card's referral "
                                           "threshold); null when the card has no policy for the method")
    refer_reason: str = Field(description="what refer means for this method, in words; 'not assessable: <reason>' "
                                          "when the input is outside the model's validated domain")
    in_domain: bool | None = Field(None, description="whether the input is one the model was validated on (DICOM "
                                                     "metadata, content and learned in-domain score); null only in "
                                                     "predictions served before medlens checked it")
    domain_score: float | None = Field(None, description="Mahalanobis distance of the image's features to the "
                                                         "training images (null when the card has no learned score)")
    domain_reason: str | None = Field(None, description="why the input is not assessable, in words (null when it is)")
    domain_note: str | None = Field(None, description="set when the model card has no learned in-domain score")
    probability_note: str | None = Field(None, description="set when the input is not assessable: the probability "
                                                           "is for research use only")
    model_id: str
    policy_hash: str | None = Field(None, description="the model card's operating-policy hash (threshold, "
                                                      "temperature, referral): with weights_sha256 it names exactly "
                                                      "what produced this answer; null only in predictions served "
                                                      "before medlens recorded it")
    weights_sha256: str
    version: str = Field(description="medlens version that served the prediction")
    input: InputInfo
    heatmap_url: str = Field(description="Grad-CAM overlay of the label shown (while the input is held)")
    source: str = Field("api", description="api: an upload to this API; dicom: made by the DICOM node (`medlens "
                                           "dicom listen`) for an image a PACS or modality sent")
    results: dict[str, str] | None = Field(None, description="DICOM node only: SOP Instance UIDs of the result "
                                                             "objects sent back (sr, and sc for the heat map)")


class DomainInfo(BaseModel):
    """What the model may be asked about (``medlens.domain``): the gates, the learned score's threshold and
    coverage, and the intended use recorded at training."""

    intended_use: str = Field(description="the population / view / modality the model was validated on, as far as "
                                          "the training data records it")
    dicom: dict[str, Any] = Field(description="the DICOM metadata gate: modalities, body parts, view positions, "
                                              "photometric interpretations, pixel spacing range (mm)")
    content: dict[str, Any] = Field(description="the content gate: minimum side (px), minimum standard deviation, "
                                                "minimum neighbouring-pixel correlation")
    learned_score: bool = Field(description="whether the card has a learned in-domain score")
    score_method: str | None = Field(None, description="e.g. mahalanobis (pooled classifier features)")
    threshold: float | None = Field(None, description="in-domain distance above which an input is refused")
    coverage: float | None = Field(None, description="share of held-apart validation images the threshold passes")
    fitted_on: str | None = Field(None, description="the images the threshold was chosen on")
    note: str | None = Field(None, description="set when the card has no learned in-domain score")


class ModelInfo(BaseModel):
    model_id: str
    model_name: str
    policy_hash: str = Field(description="sha256 (16 hex digits) of the operating policy: threshold, temperature, "
                                         "positive class and referral policy; every prediction carries it")
    weights_sha256: str
    created: str
    class_names: list[str]
    positive_class: str
    input_size: int
    threshold: float
    threshold_policy: str
    temperature: float
    uncertainty_methods: list[str] = Field(description="methods this model supports for ?uncertainty=")
    refer: dict[str, Any] = Field(description="the referral policy (coverage, measure, thresholds by method)")
    metrics: dict[str, Any] = Field(description="validation metrics of the chosen epoch")
    domain: DomainInfo = Field(description="the out-of-domain gates, their threshold and coverage, the intended use")
    versions: dict[str, str]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class AuditPage(BaseModel):
    total: int = Field(description="rows matching the filters")
    limit: int
    offset: int
    items: list[AuditRecord] = Field(description="audit rows (medlens.service.audit.AuditRecord)")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model_loaded: bool
    database: bool
    model_id: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    text = {
        400: "malformed request body",
        401: "no API key, or an unknown or revoked one",
        403: "the key's role may not do this",
        404: "not found",
        413: "upload too large, or image dimensions over the decompression-bomb limit",
        415: "not a PNG, JPEG or DICOM image",
        422: "invalid parameter, unreadable image, or DICOM without pixel data",
        429: "rate limit of this key reached (see Retry-After)",
        503: "not ready, or the audit row could not be written (the answer is withheld)",
        504: "the request took longer than the request timeout",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "the image: PNG, JPEG or DICOM (Part 10, with the 'DICM' marker)"},
                        "uncertainty": {"type": "string", "enum": list(UNCERTAINTY_METHODS),
                                        "description": "as the query parameter (the query wins if both are given)"},
                    },
                }
            }
        },
    }
}
