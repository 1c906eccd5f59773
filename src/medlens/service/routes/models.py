"""``GET /v1/models``: the served model's card summary (viewer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from medlens.domain import DEFAULT_CONTENT, DEFAULT_DICOM, NO_SCORE_NOTE
from medlens.models.card import jsonable
from medlens.service.auth import Identity
from medlens.service.context import API_PREFIX, request_context
from medlens.service.deps import require_viewer, service_state
from medlens.service.schemas import ModelsResponse, error_responses

NO_INTENDED_USE = "not recorded in this model card (trained before medlens recorded it)"
router = APIRouter(prefix=API_PREFIX, tags=["models"])


def domain_info(card: Any) -> dict[str, Any]:
    """The :class:`~medlens.service.schemas.DomainInfo` of a model card (defaults for cards without one)."""
    domain = card.domain or {}
    score = domain.get("score") or {}
    use = domain.get("intended_use")
    return {
        "intended_use": str(use.get("text", "")) if isinstance(use, dict) else str(use or NO_INTENDED_USE),
        "dicom": {**DEFAULT_DICOM, **(domain.get("dicom") or {})},
        "content": {**DEFAULT_CONTENT, **(domain.get("content") or {})},
        "learned_score": bool(score), "score_method": score.get("method"), "threshold": score.get("threshold"),
        "coverage": score.get("coverage"), "fitted_on": score.get("data"),
        "note": None if score else NO_SCORE_NOTE,
    }


def model_info(card: Any, methods: list[str]) -> dict[str, Any]:
    """The :class:`~medlens.service.schemas.ModelInfo` of a model card."""
    return {
        "model_id": card.model_id, "model_name": card.model_name, "policy_hash": card.policy_hash,
        "weights_sha256": card.weights_sha256, "created": card.created, "class_names": list(card.class_names),
        "positive_class": card.class_names[card.positive_class], "input_size": card.input_size,
        "threshold": card.threshold, "threshold_policy": card.threshold_policy, "temperature": card.temperature,
        "uncertainty_methods": list(methods), "refer": jsonable(card.refer), "metrics": jsonable(card.metrics),
        "domain": domain_info(card), "versions": dict(card.versions),
    }


@router.get("/models", response_model=ModelsResponse, summary="The served model",
            description="The model card summary of the model this server runs, with its operating-policy hash. "
                        "Needs a viewer key.",
            responses=error_responses(401, 403, 429, 503, 504))
def list_models(request: Request, identity: Annotated[Identity, Depends(require_viewer)]) -> dict[str, Any]:
    st = service_state(request)
    request_context(request).output = {"models": [st.card.model_id]}
    return {"models": [model_info(st.card, st.methods)]}
