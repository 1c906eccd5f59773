"""Clinical integration endpoints: the triage worklist, a prediction as FHIR, and the DICOM node's SR.

- ``GET /v1/worklist``: studies of the last ``hours``, most urgent first (:mod:`medlens.pacs.worklist`): positive
  calls by probability, then referrals and images that are not assessable, then the rest; each with its waiting
  time. Clinicians see their own uploads and every study the DICOM node received (those belong to the
  department); admins see all. Viewers: 403, like predictions.
- ``GET /v1/predictions/{id}/fhir``: the prediction as an R4 (R4B models) ``DiagnosticReport`` with its
  ``Observation`` (:mod:`medlens.pacs.fhir`), validated by fhir.resources, ``application/fhir+json``.
- ``GET /v1/predictions/{id}/sr.dcm``: the DICOM Structured Report the node sent to the PACS, from the node's
  spool (``dicom_spool`` setting, default ``RUN/dicom-spool``). An API upload has no SR, so it answers 404 and
  says why.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from medlens.service.auth import Identity, role_allows
from medlens.service.context import API_PREFIX, ApiError, request_context
from medlens.service.deps import owner_filter, prediction_id, require_clinician, service_state
from medlens.service.schemas import PredictionId, error_responses

router = APIRouter(prefix=API_PREFIX, tags=["clinical"])
WORKLIST_ROWS = 5000  # predictions read per worklist request, newest first


@router.get("/worklist", summary="Triage worklist",
            description="Studies of the last `hours`, most urgent first: positive calls by probability, then "
                        "referrals (uncertain or not assessable), then the rest; each with its waiting time. "
                        "Clinicians see their own uploads and every study the DICOM node received; admins all.",
            responses=error_responses(401, 403, 422, 429, 503, 504))
def get_worklist(request: Request, identity: Annotated[Identity, Depends(require_clinician)],
                 hours: Annotated[float, Query(gt=0, le=24 * 90, description="look back this many hours")] = 24.0,
                 limit: Annotated[int, Query(ge=1, le=1000, description="most studies listed")] = 200,
                 ) -> dict[str, Any]:
    from medlens.pacs import worklist

    st = service_state(request)
    now = datetime.now(timezone.utc)
    records = st.audit.list(limit=WORKLIST_ROWS, since=now - timedelta(hours=hours), action="predict", status=200)
    if not role_allows(identity.role, "admin"):
        records = [r for r in records if r.user == identity.name or r.role == "dicom"]
    items = worklist.build(records, now=now)[:limit]
    request_context(request).output = {"studies": len(items)}
    return {"generated": now.isoformat(timespec="seconds"), "hours": hours, "studies": items}


@router.get("/predictions/{id}/fhir", summary="A prediction as HL7 FHIR",
            description="An R4 DiagnosticReport (status preliminary) containing its Observation: pneumonia present "
                        "/ absent, or not assessable with the reason; probability, threshold and refer flag as "
                        "components. Same access as the prediction.",
            responses={200: {"content": {"application/fhir+json": {}}}, **error_responses(401, 403, 404, 429, 503)})
def get_fhir(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_clinician)]
             ) -> Response:
    from medlens.pacs.fhir import diagnostic_report
    st = service_state(request)
    record = st.audit.get_prediction(prediction_id(id), user=owner_filter(identity))
    if record is None or not isinstance(record.output, dict):
        raise ApiError(404, f"no prediction with id '{id}'")
    body = diagnostic_report(record.output, record).model_dump_json()
    request_context(request).output = {"prediction_id": id, "fhir": "DiagnosticReport"}
    return Response(body, media_type="application/fhir+json")


@router.get("/predictions/{id}/sr.dcm", summary="The DICOM SR of a DICOM-node prediction",
            description="The Comprehensive SR the DICOM node sent to the PACS for this prediction (application/dicom). "
                        "Only predictions of images received over DICOM have one.",
            responses={200: {"content": {"application/dicom": {}}}, **error_responses(401, 403, 404, 429, 503)})
async def get_sr(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_clinician)]
                 ) -> Response:
    st = service_state(request)
    pid = prediction_id(id)
    record = await anyio.to_thread.run_sync(lambda: st.audit.get_prediction(pid, user=owner_filter(identity)))
    if record is None:
        raise ApiError(404, f"no prediction with id '{id}'")
    if record.role != "dicom":
        raise ApiError(404, f"prediction '{id}' was an upload to this API, not an image received over DICOM: "
                            "it has no SR (GET .../fhir gives its FHIR report)")
    path = node_result(st, pid, "sr")
    if path is None:
        raise ApiError(404, f"the SR of prediction '{id}' is not in this server's DICOM spool (set dicom_spool to "
                            "the node's --spool folder)")
    data = await anyio.to_thread.run_sync(path.read_bytes)
    request_context(request).output = {"prediction_id": id, "sr_bytes": len(data)}
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{id}.sr.dcm"'})


def node_result(st: Any, pid: str, kind: str) -> Path | None:
    """The DICOM node's stored result object (sr or sc) of a prediction, or None."""
    from medlens.pacs.commands import DEFAULT_SPOOL
    from medlens.pacs.spool import RESULTS

    root = st.settings.dicom_spool or Path(st.run_dir) / DEFAULT_SPOOL
    path = Path(root) / RESULTS / f"{pid}.{kind}.dcm"
    return path if path.is_file() else None


def node_heatmap_png(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The pixels of a node's heat-map Secondary Capture as PNG (for the viewer)."""
    import io

    import pydicom
    from PIL import Image

    pixels = pydicom.dcmread(path).pixel_array
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), pixels.shape[:2]
