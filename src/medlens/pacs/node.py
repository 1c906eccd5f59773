"""The DICOM node: ``medlens dicom listen``. It receives images over DICOM, writes each to the spool before it
answers, runs the service's predictor, and sends an SR and a heat-map Secondary Capture back to a PACS.

Three threads, joined by the spool (:mod:`medlens.pacs.spool`):
1. **Receiver** (pynetdicom's server threads): C-ECHO, and C-STORE for every storage class in every transfer
   syntax. Callers are checked against the allowed AE titles and hosts (refused: ``0x0124``, not authorised).
   An instance is written durably to ``incoming/`` and recorded in the audit trail (``dicom-receive``), and only
   then does the node answer success. If the disk or the database fails, it answers ``0xA700`` (out of
   resources) and the sender keeps the image and retries.
2. **Processor**: for each pending instance, oldest first, the same predictor as the API, with calibration,
   threshold, referral and the domain checks (CT, MR and other modalities come out "not assessable"). The SR is
   always made. The heat-map Secondary Capture is made when the modality is one the model takes. Both go to
   ``results/`` and ``outbox/``. The prediction gets its audit row (``predict``, user ``dicom:CALLING_AET``);
   the API serves it, and its FHIR and SR, under that id. Only then is the instance removed from
   ``incoming/``.
3. **Sender**: sends ``outbox/`` to the destination. A file is removed once it is stored, with a
   ``dicom-send`` audit row. If the destination is down, it retries with exponential back-off (1 s doubling to
   ``max_backoff_s``).

Exactly once: request ids and result UIDs are derived from the instance's SOP Instance UID, the model and the
policy. Work redone after a crash writes the same objects and the same audit ids (an audit insert of an id
already there is a no-op), and a PACS stores one copy of a UID.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.pacs.destinations import DestinationDown
from medlens.pacs.spool import Spool

_log = logging.getLogger("medlens.pacs")

NAMESPACE = uuid.UUID("6f1d1f4e-6d1e-5c1a-9a53-6d65646c656e")  # medlens' namespace for derived request ids
SUCCESS, NOT_AUTHORISED, OUT_OF_RESOURCES = 0x0000, 0x0124, 0xA700
#: attempts at processing one instance before it is set aside in the spool's failed/ folder
MAX_ATTEMPTS = 3
#: longest side of the heat-map Secondary Capture (a full-size CR is 10 MB as RGB)
SC_MAX_SIDE = 1024


@dataclass
class NodeConfig:
    ae_title: str = "MEDLENS"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_ae_titles: tuple[str, ...] = ()  # empty: any calling AE title
    allowed_hosts: tuple[str, ...] = ()  # addresses or networks (10.0.0.0/8); empty: any host
    max_backoff_s: float = 60.0
    batch: int = 16  # results sent over one association

    def host_allowed(self, address: str) -> bool:
        if not self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_hosts)


def request_id(prefix: str, *parts: str) -> str:
    """A deterministic audit request id, a UUID like the API's (so redone work is recorded once)."""
    return str(uuid.uuid5(NAMESPACE, "\x00".join((prefix, *parts))))


def prediction_output(pid: str, result: dict[str, Any], card: Any, ds: Any, info: dict[str, Any], version: str,
                      size: int, hash_key: bytes | None, results: dict[str, str], digest: str) -> dict[str, Any]:
    """The stored prediction, in the API's ``Prediction`` shape (``GET /v1/predictions/{id}`` serves it), plus
    ``source`` / ``calling_ae_title`` / ``results`` (the SR and Secondary Capture UIDs)."""
    from medlens.models.card import jsonable
    from medlens.service.deid import deidentify_dicom_fields, dicom_fields

    output = {k: v for k, v in result.items() if k != "path"}
    output.update({
        "id": pid, "created": _iso(info.get("received")) or _iso(time.time()),
        "positive_class": card.class_names[card.positive_class],
        "uncertainty": result.get("uncertainty") or {"method": "softmax"},
        "weights_sha256": card.weights_sha256, "version": version,
        "input": {"sha256": digest, "format": "dicom", "width": int(ds.get("Columns") or 0),
                  "height": int(ds.get("Rows") or 0), "bytes": size,
                  "dicom": jsonable(deidentify_dicom_fields(dicom_fields(ds), hash_key)) if hash_key else None},
        "heatmap_url": f"/v1/predictions/{pid}/heatmap.png", "source": "dicom",
        "calling_ae_title": info.get("calling_ae_title"), "results": results,
    })
    return output


class DicomNode:
    """A running node; ``predictor`` is a :class:`medlens.inference.Predictor`, ``audit`` an
    :class:`~medlens.service.audit.AuditLog`, ``destination`` from :func:`~medlens.pacs.destinations.parse_destination`."""

    def __init__(self, config: NodeConfig, spool: Spool, predictor: Any, audit: Any, destination: Any,
                 version: str = ""):
        self.config, self.spool, self.predictor, self.audit = config, spool, predictor, audit
        self.destination, self.version = destination, version
        self._stop = threading.Event()
        self._work = threading.Event()
        self._outgoing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self.backoff_s = 0.0

    # -- lifecycle

    def start(self) -> DicomNode:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        removed = self.spool.clean_temporaries()
        if removed:
            _log.info("removed %d half-written spool files of an earlier process", removed)
        ae = AE(ae_title=self.config.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.config.allowed_ae_titles)
        ae.maximum_associations = 16
        for target, name in ((self._process_loop, "medlens-dicom-processor"), (self._send_loop, "medlens-dicom-sender")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._work.set()  # pick up what an earlier process left in the spool
        self._outgoing.set()
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                                                     (evt.EVT_REJECTED, self._on_rejected)])
        return self

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        self._outgoing.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)

    # -- receiver (pynetdicom's threads)

    def _caller(self, event: Any) -> tuple[str, str]:
        requestor = event.assoc.requestor
        return str(requestor.ae_title).strip(), str(requestor.address)

    def _on_echo(self, event: Any) -> int:
        aet, address = self._caller(event)
        return SUCCESS if self.config.host_allowed(address) else NOT_AUTHORISED

    def _on_rejected(self, event: Any) -> None:
        """An association this node rejected (a calling AE title not in --allow-aet): audited like a refusal."""
        aet, address = self._caller(event)
        _log.warning("association from %s (%s) rejected: calling AE title not allowed", aet, address)
        self._audit_quietly(request_id=request_id("rej", aet, address, f"{time.time():.6f}"), action="dicom-associate",
                            status=403, user=f"dicom:{aet}", role="dicom",
                            error=f"calling AE title '{aet}' from {address} is not an allowed caller")

    def _on_store(self, event: Any) -> int:
        from medlens.service.deid import dicom_fields

        aet, address = self._caller(event)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        received = time.time()
        rid = request_id("rx", sop_uid, f"{received:.6f}")
        if not self.config.host_allowed(address):
            _log.warning("C-STORE from %s (%s) refused: host not allowed", aet, address)
            self._audit_quietly(request_id=rid, action="dicom-receive", status=403, user=f"dicom:{aet}",
                                role="dicom", error=f"host {address} is not an allowed caller")
            return NOT_AUTHORISED
        try:
            data = event.encoded_dataset()
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.spool.accept(sop_uid, data, {"calling_ae_title": aet, "received": received,
                                              "receive_request_id": rid})
            self.audit.record(request_id=rid, action="dicom-receive", status=200, user=f"dicom:{aet}", role="dicom",
                              input_sha256=hashlib.sha256(data).hexdigest(), dicom=dicom_fields(ds))
        except Exception as exc:  # noqa: BLE001 - disk full, database down, ...: not acknowledged
            _log.error("C-STORE of %s from %s not accepted: %s", sop_uid, aet, exc)
            return OUT_OF_RESOURCES
        self._work.set()
        return SUCCESS

    def _audit_quietly(self, **fields: Any) -> None:
        try:
            self.audit.record(**fields)
        except Exception as exc:  # noqa: BLE001 - a refusal is still refused when its row cannot be written
            _log.error("audit row not written: %s", exc)

    # -- processor

    def _process_loop(self) -> None:
        failures: dict[str, int] = {}
        while not self._stop.is_set():
            self._work.wait(timeout=5.0)
            self._work.clear()
            for path in self.spool.pending():
                if self._stop.is_set():
                    return
                try:
                    self.process(path)
                except Exception as exc:  # noqa: BLE001 - keep the instance; retry, then quarantine it
                    failures[path.name] = failures.get(path.name, 0) + 1
                    if failures[path.name] < MAX_ATTEMPTS:
                        _log.error("processing %s failed (attempt %d of %d, kept in the spool): %s", path.name,
                                   failures[path.name], MAX_ATTEMPTS, exc)
                        self._stop.wait(1.0)
                        self._work.set()
                        continue  # the next instances are not held up behind this one
                    # one instance that always fails must not block the queue: set it aside, say so, go on
                    moved = self.spool.quarantine(path)
                    _log.error("processing %s failed %d times: moved to %s (%s)", path.name, MAX_ATTEMPTS, moved, exc)
                    self._audit_quietly(request_id=request_id("fail", path.name), action="dicom-failed",
                                        status=500, user=f"dicom:{self.spool.info(moved).get('calling_ae_title')}",
                                        role="dicom", error=f"{type(exc).__name__}: {exc}"[:500])
                    failures.pop(path.name, None)

    def process(self, path: Path) -> str:
        """Predict one spooled instance, write its SR (and Secondary Capture), record it; the prediction id."""
        import pydicom

        from medlens.data.dicom import read_dicom_dataset
        from medlens.errors import DataError
        from medlens.pacs.results import make_secondary_capture, make_sr
        from medlens.service.deid import dicom_fields

        started = time.perf_counter()
        info = self.spool.info(path)
        card = self.predictor.card
        data = path.read_bytes()  # read, parsed and decoded once: prediction, heat map, SR and audit share it
        digest = hashlib.sha256(data).hexdigest()
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_uid = str(ds.SOPInstanceUID)
        pid = request_id("dcm", sop_uid, card.model_id, card.policy_hash)
        try:
            decoded: tuple[Any, dict] | None = read_dicom_dataset(ds, "the image")
        except DataError as exc:
            decoded, error = None, exc

        def read(_path: Any) -> tuple[Any, dict]:
            if decoded is None:
                raise error
            return decoded

        result = self.predictor.predict([path], read=read)[0]
        if "error" in result:  # unreadable pixels: an SR that says so
            result = {"in_domain": False, "domain_reason": result["error"], "positive": None, "label": None,
                      "probability": None, "threshold": float(card.threshold), "refer": True,
                      "refer_reason": "not assessable: the image could not be read",
                      "model_id": card.model_id, "policy_hash": card.policy_hash}
        with warnings.catch_warnings():  # highdicom warns about the source's one-part person names
            warnings.simplefilter("ignore", UserWarning)
            sr = make_sr(ds, result, card, version=self.version)
            picture = None if decoded is None else self._heatmap(*decoded, result)
            sc = None if picture is None else make_secondary_capture(ds, picture, card)
        self.spool.add_result(pid, "sr", str(sr.SOPInstanceUID), _encode(sr))
        results = {"sr": str(sr.SOPInstanceUID)}
        if sc is not None:
            self.spool.add_result(pid, "sc", str(sc.SOPInstanceUID), _encode(sc))
            results["sc"] = str(sc.SOPInstanceUID)
        output = prediction_output(pid, result, card, ds, info, self.version, len(data),
                                   self.audit.hash_key, results, digest)
        self.audit.record(request_id=pid, action="predict", status=200, user=f"dicom:{info.get('calling_ae_title')}",
                          role="dicom", input_sha256=digest, dicom=dicom_fields(ds),
                          model_id=card.model_id, policy_hash=card.policy_hash,
                          weights_sha256=card.weights_sha256 or None, output=output,
                          latency_ms=(time.perf_counter() - started) * 1000.0, in_domain=result.get("in_domain"),
                          domain_score=result.get("domain_score"), domain_reason=result.get("domain_reason"))
        self.spool.done(path)
        self._outgoing.set()
        _log.info("processed %s: %s (%s)", pid, result.get("label") or "not assessable",
                  ", ".join(f"{k} {v}" for k, v in results.items()))
        return pid

    def _heatmap(self, image: Any, meta: dict[str, Any], result: dict[str, Any]) -> Any:
        """The Grad-CAM overlay of the label shown, or None when the modality is not one the model takes."""
        import numpy as np
        from PIL import Image

        from medlens.domain import metadata_reason
        from medlens.explain import overlay
        from medlens.forward import normalize_batch, shown_class

        if metadata_reason(meta, (self.predictor.card.domain or {}).get("dicom")) is not None:
            return None
        card = self.predictor.card
        target = int(shown_class(float(result.get("probability") or 0.0), card.threshold, card.positive_class))
        x = normalize_batch(self.predictor.prepare(image).to(self.predictor.device), card.intensity)
        cam = self.predictor.explain(x, "gradcam", target=target).maps[0].detach().float().cpu().numpy()
        scale = SC_MAX_SIDE / max(image.shape)
        if scale < 1:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        return overlay(image, cam, alpha=0.4)

    # -- sender

    def _send_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._outgoing.wait(timeout=5.0)
            self._outgoing.clear()
            while not self._stop.is_set():
                batch = self.spool.outbox()[: self.config.batch]
                if not batch:
                    break
                try:
                    outcome = self.destination.send(batch)
                except (DestinationDown, OSError) as exc:
                    failures += 1
                    self.backoff_s = min(self.config.max_backoff_s, 2.0 ** (failures - 1))
                    _log.warning("destination down (%s); %d results wait, retry in %.0f s", exc,
                                 len(self.spool.outbox()), self.backoff_s)
                    self._stop.wait(self.backoff_s)
                    continue
                failures, self.backoff_s = 0, 0.0
                for p, error in outcome.items():
                    self._record_send(p, error)
                    if error is None:
                        self.spool.sent(p)
                if any(e is not None for e in outcome.values()):  # refused files stay; do not spin on them
                    self._stop.wait(min(self.config.max_backoff_s, 30.0))

    def _record_send(self, path: Path, error: str | None) -> None:
        uid = path.stem
        self._audit_quietly(request_id=request_id("tx", uid, error or "stored"), action="dicom-send",
                            status=200 if error is None else 502, user="dicom:node", role="dicom",
                            output={"sop_instance_uid": uid, "destination": self.destination.describe()},
                            error=error)


def _encode(ds: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _iso(ts: float | None) -> str | None:
    from datetime import datetime, timezone

    return None if ts is None else datetime.fromtimestamp(float(ts), timezone.utc).isoformat(timespec="milliseconds")
