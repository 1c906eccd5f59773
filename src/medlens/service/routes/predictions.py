"""``/v1/predictions``: submit an image (clinician), read a past prediction and its heat map (its owner, or an admin).

A prediction is answered only after its audit row is committed (:mod:`medlens.service.middleware`); it carries
the model id, the card's operating-policy hash and the weights' digest, so every answer names exactly what
produced it. ``GET /v1/predictions/{id}`` reads the prediction back from the audit trail (it survives
restarts); the heat map needs the input image, held in memory for the last ``cache_size`` predictions only.

Scope. A prediction (and its heat map, which shows the X-ray) is read by the clinician whose key made it and by
admins; a viewer key reads the model information only (403 here, whatever the id). Another user's prediction id
answers 404 with the same sentence as an id that does not exist, not 403: a 403 would confirm that the id is a
real prediction, so ids could be probed. Every such attempt is still in the audit trail under the caller's name.
Predictions made by the DICOM node (``medlens dicom listen``, role ``dicom``) belong to the department that sent
the study, not to one key: every clinician reads them, as on the worklist (:mod:`.clinical`).
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

import medlens
from medlens.domain import DomainGate, apply_verdict
from medlens.forward import decide, shown_class
from medlens.models.card import jsonable, normalize_batch
from medlens.service.auth import Identity
from medlens.service.context import API_PREFIX, ApiError, RequestContext, printable, request_context
from medlens.service.deid import deidentify_dicom_fields
from medlens.service.deps import owner_filter, prediction_id, require_clinician, service_state
from medlens.service.schemas import (
    MULTIPART_BODY,
    UNCERTAINTY_METHODS,
    Prediction,
    PredictionId,
    UncertaintyMethod,
    error_responses,
)
from medlens.service.state import INPUT_CACHE_SIZE, HeldInput, ServiceState
from medlens.service.uploads import (
    DISPLAY_MAX_SIDE,
    DecodedUpload,
    decode_upload,
    plan_and_decode,
    read_upload,
    sha256,
)

router = APIRouter(prefix=API_PREFIX, tags=["predictions"])


@router.post(
    "/predictions", response_model=Prediction, summary="Predict one image",
    description="Upload one PNG, JPEG or DICOM image as multipart/form-data (field `file`). Returns the "
                "calibrated probability, the label at the model's operating threshold, the uncertainty of the "
                "chosen method and whether to refer the case to a radiologist, with the model id and the card's "
                "operating-policy hash. Needs a clinician key. The answer is sent only after its audit row is "
                "committed.",
    responses=error_responses(400, 401, 403, 413, 415, 422, 429, 503, 504),
    openapi_extra=MULTIPART_BODY,
)
async def create_prediction(
    request: Request,
    identity: Annotated[Identity, Depends(require_clinician)],
    uncertainty: Annotated[UncertaintyMethod | None, Query(
        description="how to estimate the uncertainty: softmax (one pass, default), mc (MC dropout), "
                    "tta (test-time augmentation) or ensemble (an ensemble run's members)")] = None,
) -> dict[str, Any]:
    st = service_state(request)
    ctx = request_context(request)
    data, form_method = await read_upload(request, st.settings.max_upload_bytes)
    ctx.input_sha256 = sha256(data)
    method = uncertainty or form_method or "softmax"
    if method not in UNCERTAINTY_METHODS:
        raise ApiError(422, f"unknown uncertainty method '{printable(method, 40)}': use softmax, mc, tta or "
                            "ensemble")
    if method not in st.methods:
        raise ApiError(422, f"this model does not support uncertainty '{method}' (it supports "
                            f"{', '.join(st.methods)}){' (ensemble needs an ensemble run)' if method == 'ensemble' else ''}")
    # the header first (413 / 415 / 422), then the decode on the same thread if the gate is open at once
    plan, decoded = await anyio.to_thread.run_sync(plan_and_decode, data, ctx, st.settings, st.predictor,
                                                   st.decode_gate)
    if decoded is None:
        async with st.decode_gate.reserve(plan.estimate):  # waits while the decodes in flight fill the budget
            decoded = await anyio.to_thread.run_sync(decode_upload, data, ctx, st.settings, st.predictor, plan)
    result = await st.runner.submit(decoded.image, method)
    prediction = prediction_body(ctx, st, method, result, decoded, len(data))
    ctx.output = prediction
    st.inputs.put(ctx.request_id, HeldInput(decoded.image, decoded.display, prediction.pop("_target")))
    st.metrics.observe_prediction(method, prediction["probability"], prediction["label"] or "not assessable",
                                  prediction["refer"])
    return prediction


@router.get(
    "/predictions/{id}", response_model=Prediction, summary="A past prediction",
    description="The prediction with this id, as returned when it was made (read from the audit trail, so it "
                "survives restarts). Needs the clinician key that made it, or an admin key; another user's "
                "prediction is a 404, like an unknown id.",
    responses=error_responses(401, 403, 404, 422, 429, 503, 504),
)
def get_prediction(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_clinician)]
                   ) -> dict[str, Any]:
    st = service_state(request)
    record = st.audit.get_prediction(prediction_id(id), user=owner_filter(identity))
    if record is None or not isinstance(record.output, dict):
        raise ApiError(404, f"no prediction with id '{id}'")  # also another user's: 404, not 403 (no probing)
    request_context(request).output = {"prediction_id": id}
    return record.output


@router.get(
    "/predictions/{id}/heatmap.png", response_class=Response, summary="Heat map of a recent prediction",
    description="Grad-CAM overlay (PNG) of the label shown at the operating threshold, over the uploaded image "
                f"(scaled so its longest side is at most {DISPLAY_MAX_SIDE} px). The inputs of the last "
                f"{INPUT_CACHE_SIZE} predictions are held in memory; older ones (or any from before a restart) "
                "answer 404. Needs the clinician key that made the prediction, or an admin key; another user's "
                "prediction is a 404, like an unknown id.",
    responses={200: {"content": {"image/png": {}}, "description": "the overlay"},
               **error_responses(401, 403, 404, 422, 429, 503, 504)},
)
async def get_heatmap(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_clinician)],
                      alpha: Annotated[float, Query(ge=0.0, le=1.0, description="heat-map opacity")] = 0.4,
                      ) -> Response:
    st = service_state(request)
    pid, owner = prediction_id(id), owner_filter(identity)
    record = await anyio.to_thread.run_sync(lambda: st.audit.get_prediction(pid, user=owner))
    if record is None:
        raise ApiError(404, f"no prediction with id '{id}'")  # also another user's: 404, not 403 (no probing)
    held = st.inputs.get(id)
    if held is None and record.role == "dicom":  # the DICOM node's heat map: its Secondary Capture's pixels
        from medlens.service.routes.clinical import node_heatmap_png, node_result

        sc = node_result(st, pid, "sc")
        if sc is None:
            raise ApiError(404, f"prediction '{id}' has no heat map (the image was not assessable, or the node's "
                                "spool is not this server's dicom_spool)")
        png, (height, width) = await anyio.to_thread.run_sync(node_heatmap_png, sc)
        request_context(request).output = {"prediction_id": id, "width": width, "height": height,
                                           "method": "gradcam", "source": "dicom", "png_sha256": sha256(png)}
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    if held is None:
        raise ApiError(404, f"the input image of prediction '{id}' is no longer held by this server (it keeps "
                            f"the last {st.inputs.capacity} in memory, none across restarts); submit the image "
                            "again for a new prediction and heat map")
    png, (height, width) = await anyio.to_thread.run_sync(render_heatmap, st, held, alpha)
    request_context(request).output = {"prediction_id": id, "width": width, "height": height, "alpha": alpha,
                                       "method": "gradcam", "png_sha256": sha256(png)}
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def prediction_body(ctx: RequestContext, st: ServiceState, method: str, result: dict[str, Any],
                    decoded: DecodedUpload, size: int) -> dict[str, Any]:
    """The response body of a prediction (plus ``_target``, the class shown, for the heat map)."""
    card = st.card
    probability = float(result["probability"])
    positive, label = decide(probability, card)  # the one home of the shown-label rule
    target = int(shown_class(probability, card.threshold, card.positive_class))  # the class shown: heat map
    refer = result.get("refer")
    refer = None if refer is None or int(refer) < 0 else bool(refer)
    dicom = None
    if ctx.dicom:
        dicom = deidentify_dicom_fields(ctx.dicom, st.settings.audit_key)
    body = {
        "id": ctx.request_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "probability": round(probability, 6),
        "positive_class": card.class_names[card.positive_class],
        "label": label,
        "positive": positive,
        "threshold": round(float(card.threshold), 6),
        "uncertainty": {
            "method": method,
            "predictive_entropy": round(float(result["predictive_entropy"]), 6),
            "decision_entropy": round(float(result["decision_entropy"]), 6),
            "mutual_information": round(float(result["mutual_information"]), 6),
            "variance": round(float(result["variance"]), 8),
            "passes": int(result["passes"]),
        },
        "refer": refer,
        "refer_reason": st.predictor.refer_note(method),
        "model_id": card.model_id,
        "policy_hash": card.policy_hash,
        "weights_sha256": card.weights_sha256,
        "version": medlens.__version__,
        "input": {"sha256": ctx.input_sha256, "format": decoded.kind, "width": decoded.width,
                  "height": decoded.height, "bytes": size, "dicom": jsonable(dicom) if dicom else None},
        "heatmap_url": f"{API_PREFIX}/predictions/{ctx.request_id}/heatmap.png",
        "source": "api", "results": None,
        "_target": target,
    }
    # is the input assessable? (medlens.domain: DICOM metadata and content gates, then the learned score)
    gate = st.predictor.gate or DomainGate(card.domain)
    score = result.get("domain_score")
    return apply_verdict(body, gate.combine(decoded.domain_reason, None if score is None else float(score)))


def render_heatmap(st: ServiceState, held: HeldInput, alpha: float) -> tuple[bytes, tuple[int, int]]:
    """Grad-CAM of the held input's shown label, over its display image, as PNG bytes (worker thread)."""
    from PIL import Image

    from medlens.explain import overlay

    if held.cam is None:
        predictor = st.predictor
        x = normalize_batch(held.image.to(predictor.device), predictor.card.intensity)
        with st.lock.exclusive():  # the explainer hooks a layer of the shared model
            result = predictor.explain(x, "gradcam", target=held.target)
        held.cam = result.maps[0].detach().float().cpu().numpy()
    picture = overlay(held.display, held.cam, alpha=alpha)
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), picture.shape[:2]
