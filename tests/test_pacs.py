"""Issue 11: the PACS loop. Studies come in over DICOM and results go back as DICOM SR and Secondary Capture,
and as FHIR and a worklist, proven against a real Orthanc.

Unit tests first (SR content, derived UIDs, burned-in disclaimer, dciodvfy, spool, worklist order, FHIR), then
end to end with Debian's Orthanc, dcmtk's storescu and ``medlens dicom listen`` as subprocesses:
- the shared DICOM files (two chest CR, one CT, one MR) sent to Orthanc and routed to the node come back in
  their studies: the CRs get an SR and a heat map, the CT and MR an SR that says "not assessable" and why;
- with the destination down, the node keeps the results. It is killed with SIGKILL after acknowledging and
  restarted, and once Orthanc is back every result arrives exactly once.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from helpers import require_module, require_shared

require_module("pynetdicom")
require_module("highdicom")
fhir_models = require_module("fhir.resources.R4B.diagnosticreport")
pydicom = require_module("pydicom")

from medlens.pacs import worklist  # noqa: E402
from medlens.pacs.fhir import diagnostic_report  # noqa: E402
from medlens.pacs.results import DISCLAIMER, make_secondary_capture, make_sr  # noqa: E402
from medlens.pacs.spool import Spool  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on the sources' one-part names

CARD = types.SimpleNamespace(model_id="seed_cnn-0123456789ab", policy_hash="e51ffd2257c76ab2",
                             weights_sha256="ab" * 32, threshold=0.7, class_names=["NORMAL", "PNEUMONIA"],
                             positive_class=1)


@pytest.fixture(scope="module")
def dicom_dir() -> Path:
    return require_shared("dicom")


def _siim(dicom_dir: Path) -> Path:
    return next(dicom_dir.glob("siim_*.dcm"))


def _result(positive: bool | None, *, in_domain: bool = True, reason: str | None = None) -> dict:
    return {"probability": 0.91 if positive else 0.12, "positive": positive, "threshold": 0.7,
            "label": None if positive is None else ("PNEUMONIA" if positive else "NORMAL"),
            "refer": not in_domain, "refer_reason": f"not assessable: {reason}" if reason else "uncertain",
            "in_domain": in_domain, "domain_reason": reason}


def _items(ds) -> list:
    """Every content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _value(sr, code: str):
    for item in _items(sr):
        if item.ConceptNameCodeSequence[0].CodeValue == code:
            if item.ValueType == "CODE":
                return item.ConceptCodeSequence[0].CodeValue
            if item.ValueType == "NUM":
                return float(item.MeasuredValueSequence[0].NumericValue)
            return str(item.get("TextValue"))
    return None


# ------------------------------------------------------------------------------------------------ SR + SC


def test_sr_codes_the_finding_probability_referral_and_algorithm(dicom_dir):
    source = pydicom.dcmread(_siim(dicom_dir))
    present = make_sr(source, _result(True), CARD, version="0.1.0")
    absent = make_sr(source, _result(False), CARD, version="0.1.0")
    not_assessable = make_sr(source, _result(None, in_domain=False, reason="modality CT is not validated"), CARD,
                             version="0.1.0")
    assert _value(present, "233604007") == "52101004"  # Pneumonia: Present
    assert _value(absent, "233604007") == "2667000"  # Absent
    assert _value(not_assessable, "233604007") == "82334004"  # Indeterminate
    assert "modality CT" in _value(not_assessable, "NOTASSESS")
    assert _value(present, "PROB") == pytest.approx(0.91) and _value(present, "THRESH") == pytest.approx(0.7)
    assert _value(present, "REFER") == "373067005" and _value(not_assessable, "REFER") == "373066001"  # No / Yes
    params = _value(present, "111002")
    assert CARD.weights_sha256 in params and CARD.policy_hash in params and CARD.model_id in params
    assert "NOT FOR DIAGNOSTIC USE" in _value(present, "DISCLAIM")
    # same study, a new series; the UIDs are derived: the same input and policy give the same objects
    assert present.StudyInstanceUID == source.StudyInstanceUID
    assert present.SeriesInstanceUID != source.SeriesInstanceUID and present.Modality == "SR"
    again = make_sr(source, _result(True), CARD, version="0.1.0")
    assert again.SOPInstanceUID == present.SOPInstanceUID and again.SeriesInstanceUID == present.SeriesInstanceUID
    other_policy = types.SimpleNamespace(**{**vars(CARD), "policy_hash": "0000000000000000"})
    assert make_sr(source, _result(True), other_policy, version="0.1.0").SOPInstanceUID != present.SOPInstanceUID


def test_secondary_capture_has_the_disclaimer_burned_in(dicom_dir):
    source = pydicom.dcmread(_siim(dicom_dir))
    picture = np.full((200, 300, 3), 40, np.uint8)
    sc = make_secondary_capture(source, picture, CARD)
    pixels = sc.pixel_array
    assert pixels.shape[1] == 300 and pixels.shape[0] > 200  # a band on top, the picture kept whole
    band = pixels[: pixels.shape[0] - 200]
    assert ((band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)).sum() > 50  # yellow text
    assert np.array_equal(pixels[-200:], picture)
    assert sc.StudyInstanceUID == source.StudyInstanceUID and DISCLAIMER


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    path = shutil.which("dciodvfy")
    if path is None:
        from helpers import _missing

        _missing("dciodvfy is not installed (apt-get install dicom3tools)")
    return path


def _dciodvfy_errors(tool: str, path: Path) -> list[str]:
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_sr_and_secondary_capture_pass_dciodvfy(dicom_dir, dciodvfy, tmp_path):
    # the SIIM file's Patient's Age is "62" (invalid AS): highdicom copies it; the result must not repeat it
    source = pydicom.dcmread(_siim(dicom_dir))
    for name, ds in (("sr", make_sr(source, _result(True), CARD, version="0.1.0")),
                     ("sc", make_secondary_capture(source, np.zeros((64, 80, 3), np.uint8), CARD))):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(dciodvfy, path) == [], name


# ------------------------------------------------------------------------------------------ spool, worklist


def test_spool_keeps_acknowledged_instances_and_drops_half_written_ones(tmp_path):
    spool = Spool(tmp_path / "spool")
    kept = spool.accept("1.2.3", b"DICM-ish", {"calling_ae_title": "CR1"})
    (kept.parent / ".tmp-abc.dcm").write_bytes(b"half")  # a process died while writing
    (kept.parent / "deadbeef.json").write_text("{}")  # info written, instance never acknowledged
    again = Spool(tmp_path / "spool")
    assert again.clean_temporaries() == 1
    assert again.pending() == [kept] and again.info(kept)["calling_ae_title"] == "CR1"
    assert not (kept.parent / "deadbeef.json").exists()
    assert oct((tmp_path / "spool").stat().st_mode & 0o777) == "0o700"
    again.add_result("pid", "sr", "9.9.9", b"SR")
    assert [p.name for p in again.outbox()] == ["9.9.9.dcm"] and again.result_path("pid", "sr").read_bytes() == b"SR"
    again.done(kept)
    assert again.pending() == []


def _record(rid: str, study: str | None, minutes_ago: float, **output) -> types.SimpleNamespace:
    created = (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat()
    return types.SimpleNamespace(request_id=rid, time=created, output={"created": created, **output},
                                 dicom={"StudyInstanceUID": study, "Modality": "CR"} if study else None)


def test_worklist_puts_positive_calls_by_probability_then_referrals_then_the_rest():
    records = [
        _record("routine-old", "s1", 50, positive=False, probability=0.1, refer=False, in_domain=True),
        _record("pos-low", "s2", 5, positive=True, probability=0.80, refer=False, in_domain=True),
        _record("refer", "s3", 1, positive=False, probability=0.4, refer=True, in_domain=True),
        _record("not-assessable", "s4", 30, positive=None, probability=0.9, refer=True, in_domain=False),
        _record("pos-high", None, 1, positive=True, probability=0.97, refer=False, in_domain=True),
        _record("routine-new", "s5", 2, positive=False, probability=0.2, refer=False, in_domain=True),
        # a second image of study s1 that is positive lifts the whole study to the top tier
        _record("s1-lateral", "s1", 49, positive=True, probability=0.85, refer=False, in_domain=True),
    ]
    items = worklist.build(records)
    order = [(i["predictions"][0], i["priority"]) for i in items]
    assert order == [("pos-high", "positive"), ("routine-old", "positive"), ("pos-low", "positive"),
                     ("not-assessable", "refer"), ("refer", "refer"), ("routine-new", "routine")]
    assert items[1]["probability"] == 0.85 and items[1]["waiting_s"] >= 49 * 60
    assert items[3]["probability"] is None  # a not-assessable image's probability is not shown


def test_fhir_report_validates_and_says_present_absent_or_not_assessable():
    record = types.SimpleNamespace(request_id="6a1e0000-0000-4000-8000-000000000001", time="2026-12-03T08:00:00Z",
                                   model_id=CARD.model_id, policy_hash=CARD.policy_hash)
    base = {"id": record.request_id, "created": "2026-12-03T08:00:00.123+00:00", "threshold": 0.7}
    for positive, in_domain, expected in ((True, True, "52101004"), (False, True, "2667000"), (None, False, None)):
        output = {**base, **_result(positive, in_domain=in_domain, reason=None if in_domain else "modality MR")}
        text = diagnostic_report(output, record).model_dump_json()
        report = fhir_models.DiagnosticReport.model_validate_json(text)  # validates on the way back in
        obs = report.contained[0]
        assert report.status == "preliminary" and report.result[0].reference == "#finding"
        assert obs.code.coding[0].code == "233604007"
        if expected:
            assert obs.valueCodeableConcept.coding[0].code == expected
            assert float(obs.component[0].valueQuantity.value) == pytest.approx(output["probability"])
        else:
            assert obs.valueCodeableConcept is None and obs.dataAbsentReason.coding[0].code == "not-performed"
            assert any("modality MR" in n.text for n in obs.note)
            assert all(c.code.coding[0].code != "PROB" for c in obs.component)  # no probability shown


# ------------------------------------------------------------------------------------------ real Orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from pacs_harness import require_pacs_tools

    require_pacs_tools()
    return tmp_path_factory.mktemp("pacs")


def _audit_rows(db: Path) -> list:
    from medlens.service.audit import AuditLog

    with AuditLog(f"sqlite:///{db}") as log:
        return log.list(limit=1000)


def test_orthanc_round_trip_sr_heatmap_not_assessable_fhir_and_worklist(pacs, tiny_run, dicom_dir, dciodvfy):
    from pacs_harness import Node, Orthanc, free_port, result_series, wait_for

    node_port = free_port()
    orthanc = Orthanc(pacs / "orthanc", node_port).start()
    node = Node(tiny_run, pacs / "node", orthanc.destination, port=node_port).start()
    try:
        files = sorted(dicom_dir.glob("*.dcm"))
        orthanc.store(files)
        studies = {s["MainDicomTags"]["StudyInstanceUID"]: s["ID"] for s in orthanc.studies()}
        modality = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID):
                    pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files}
        for study_id in studies.values():
            orthanc.post("/modalities/medlens/store", study_id)
        for uid, study_id in studies.items():
            want = {"SR", "OT"} if modality[uid] == "CR" else {"SR"}
            got = wait_for(lambda sid=study_id, w=want: (c := result_series(orthanc, sid)) and w <= set(c) and c,
                           120, f"results in study {uid}")
            assert got == {modality[uid]: 1, **{m: 1 for m in want}}, (uid, got)
        # the CT / MR SRs say not assessable, and why; every object passes dciodvfy
        for study_id in studies.values():
            for series in orthanc.series_of(study_id):
                m = series["MainDicomTags"]["Modality"]
                if m not in ("SR", "OT"):
                    continue
                path = pacs / f"{series['Instances'][0]}.dcm"
                path.write_bytes(orthanc.instance_file(series["Instances"][0]))
                assert _dciodvfy_errors(dciodvfy, path) == [], m
                if m == "SR":
                    sr = pydicom.dcmread(path)
                    source = modality[str(sr.StudyInstanceUID)]
                    if source in ("CT", "MR"):
                        assert _value(sr, "233604007") == "82334004"
                        assert f"modality {source}" in _value(sr, "NOTASSESS")
        rows = _audit_rows(node.db)
        by_action: dict[str, list] = {}
        for r in rows:
            by_action.setdefault(r.action, []).append(r)
        assert len(by_action["dicom-receive"]) == 4 and all(r.status == 200 for r in by_action["dicom-receive"])
        assert len(by_action["predict"]) == 4 and len(by_action["dicom-send"]) == 6  # 4 SR + 2 SC
        assert all("PatientName" not in (r.dicom or {}) or str(r.dicom["PatientName"]).startswith("hmac-sha256:")
                   for r in rows)
        _check_api(tiny_run, node, by_action["predict"], orthanc)
    finally:
        node.stop()
        orthanc.stop()


def _check_api(run: Path, node, predictions: list, orthanc) -> None:
    """The API on the node's audit database and spool: worklist, FHIR, SR download, heat map."""
    require_module("httpx")
    from fastapi.testclient import TestClient

    from medlens.service.app import create_app
    from medlens.service.auth import KeyStore
    from medlens.service.settings import ServiceSettings

    settings = dataclasses.replace(ServiceSettings.load(run, database=node.db, env={}), dicom_spool=node.spool,
                                   audit_key_file=None)
    with KeyStore(settings.database_url) as store:
        clinician, viewer = store.create("dr-a", "clinician"), store.create("v", "viewer")
    with TestClient(create_app(run, settings)) as client:
        auth = {"Authorization": f"Bearer {clinician}"}
        listed = client.get("/v1/worklist", headers=auth)
        assert listed.status_code == 200, listed.text
        studies = listed.json()["studies"]
        assert len(studies) == 4
        ranks = [{"positive": 0, "refer": 1, "routine": 2}[s["priority"]] for s in studies]
        assert ranks == sorted(ranks)
        assert client.get("/v1/worklist", headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
        for row in predictions:
            pid = row.request_id
            got = client.get(f"/v1/predictions/{pid}", headers=auth)
            assert got.status_code == 200 and got.json()["source"] == "dicom", got.text
            fhir = client.get(f"/v1/predictions/{pid}/fhir", headers=auth)
            assert fhir.headers["content-type"].startswith("application/fhir+json")
            fhir_models.DiagnosticReport.model_validate_json(fhir.text)
            sr = client.get(f"/v1/predictions/{pid}/sr.dcm", headers=auth)
            assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
            uid = str(pydicom.dcmread(__import__("io").BytesIO(sr.content)).SOPInstanceUID)
            assert uid == row.output["results"]["sr"]
            heat = client.get(f"/v1/predictions/{pid}/heatmap.png", headers=auth)
            assert heat.status_code == (200 if "sc" in row.output["results"] else 404), heat.text


def test_destination_down_then_kill9_every_result_arrives_once(pacs, tiny_run, dicom_dir):
    from pacs_harness import Node, Orthanc, free_port, result_series, send_to_node, wait_for

    node_port = free_port()
    orthanc = Orthanc(pacs / "orthanc-down", node_port)  # configured, not started: the destination is down
    node = Node(tiny_run, pacs / "node-down", orthanc.destination, port=node_port).start()
    chest = sorted(dicom_dir.glob("*.dcm"))
    chest = [f for f in chest if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CR"]
    try:
        send_to_node(chest[:1], node.port)
        wait_for(lambda: "processed" in node.log(), 120, "the first instance processed")
        wait_for(lambda: "destination down" in node.log(), 30, "a failed send")
        send_to_node(chest[1:], node.port)  # acknowledged ...
        node.kill()  # ... and killed at once: processed or not, nothing sent
        assert len(list((node.spool / "incoming").glob("*.dcm"))) + len(
            list((node.spool / "outbox").glob("*.dcm"))) >= 1
        node.start()  # a restart picks up the spool
        time.sleep(3)
        orthanc.start()  # the destination comes back
        studies = {}
        for f in chest:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            studies[uid] = wait_for(lambda u=uid: next((s["ID"] for s in orthanc.studies()
                                                        if s["MainDicomTags"]["StudyInstanceUID"] == u), None),
                                    120, f"study {uid} in Orthanc")
        for uid, sid in studies.items():
            got = wait_for(lambda s=sid: (c := result_series(orthanc, s)) and {"SR", "OT"} <= set(c) and c, 120,
                           f"SR and heat map of {uid}")
            assert got == {"SR": 1, "OT": 1}, got  # the sources were not sent to Orthanc: results only, once each
        wait_for(lambda: not list((node.spool / "outbox").glob("*.dcm")), 30, "an empty outbox")
        rows = _audit_rows(node.db)
        predictions = [r for r in rows if r.action == "predict"]
        assert len(predictions) == len(chest) == len({r.request_id for r in predictions})
        sent = [r for r in rows if r.action == "dicom-send" and r.status == 200]
        assert len({r.output["sop_instance_uid"] for r in sent}) == 2 * len(chest)
    finally:
        node.stop()
        orthanc.stop()


def test_callers_outside_the_allowed_hosts_and_ae_titles_are_refused_and_audited(pacs, tiny_run, dicom_dir):
    from pacs_harness import Node, send_to_node

    ct = dicom_dir / "CT_small.dcm"
    node = Node(tiny_run, pacs / "node-allow", "ORTHANC@127.0.0.1:9", extra=("--allow-host", "10.0.0.0/8")).start()
    try:
        with pytest.raises(RuntimeError, match="Status: 0x124"):
            send_to_node([ct], node.port)
    finally:
        node.stop()
    rows = _audit_rows(node.db)
    assert [(r.action, r.status) for r in rows] == [("dicom-receive", 403)]
    assert "127.0.0.1" in rows[0].error and not list((node.spool / "incoming").glob("*.dcm"))
    strict = Node(tiny_run, pacs / "node-aet", "ORTHANC@127.0.0.1:9", extra=("--allow-aet", "PACS1")).start()
    try:
        with pytest.raises(RuntimeError, match="[Rr]eject"):
            send_to_node([ct], strict.port, calling="INTRUDER")
        send_to_node([ct], strict.port, calling="PACS1")  # the allowed caller gets in
    finally:
        strict.stop()
    rows = _audit_rows(strict.db)
    assert "dicom-receive" in {r.action for r in rows if r.status == 200}
    rejected = [r for r in rows if r.action == "dicom-associate"]
    assert len(rejected) == 1 and rejected[0].status == 403 and "INTRUDER" in rejected[0].error


def test_results_by_stow_rs_to_orthanc_dicomweb(pacs, tiny_run, dicom_dir):
    from pacs_harness import Node, Orthanc, free_port, result_series, send_to_node, wait_for

    node_port = free_port()
    orthanc = Orthanc(pacs / "orthanc-stow", node_port).start()
    node = Node(tiny_run, pacs / "node-stow", f"{orthanc.url}/dicom-web", port=node_port).start()
    try:
        mr = dicom_dir / "MR_small.dcm"
        send_to_node([mr], node.port)  # a modality sends to the node directly; the node STOWs the SR to the PACS
        uid = str(pydicom.dcmread(mr, stop_before_pixels=True).StudyInstanceUID)
        sid = wait_for(lambda: next((s["ID"] for s in orthanc.studies()
                                     if s["MainDicomTags"]["StudyInstanceUID"] == uid), None), 120, "the SR's study")
        assert wait_for(lambda: result_series(orthanc, sid), 60, "the SR series") == {"SR": 1}
    finally:
        node.stop()
        orthanc.stop()
    sent = [r for r in _audit_rows(node.db) if r.action == "dicom-send"]
    assert len(sent) == 1 and sent[0].status == 200 and "STOW-RS" in sent[0].output["destination"]


def test_an_instance_that_always_fails_is_set_aside_and_does_not_block_the_queue(tmp_path, tiny_run, dicom_dir):
    """A poison instance: processing raises every time. After MAX_ATTEMPTS it goes to failed/ with an audit row,
    and the instance behind it is processed (before, the loop retried the oldest file forever)."""
    import threading

    from pacs_harness import wait_for

    from medlens.inference import Predictor
    from medlens.pacs.node import MAX_ATTEMPTS, DicomNode, NodeConfig
    from medlens.service.audit import AuditLog

    predictor = Predictor.from_run(tiny_run)
    real_predict = predictor.predict

    def predict(paths, **kw):
        if pydicom.dcmread(paths[0], stop_before_pixels=True).Modality == "CT":
            raise RuntimeError("decoder crashed")
        return real_predict(paths, **kw)

    predictor.predict = predict
    spool = Spool(tmp_path / "spool")
    for name in ("CT_small.dcm", "MR_small.dcm"):  # the CT is older: first in the queue
        data = (dicom_dir / name).read_bytes()
        spool.accept(str(pydicom.dcmread(dicom_dir / name).SOPInstanceUID), data, {"calling_ae_title": "MOD1"})
        time.sleep(0.01)
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", hash_key=b"k" * 32)
    node = DicomNode(NodeConfig(), spool, predictor, audit, destination=None)
    worker = threading.Thread(target=node._process_loop, daemon=True)
    node._work.set()
    worker.start()
    try:
        wait_for(lambda: list((spool.root / "failed").glob("*.dcm")), 60, "the CT set aside")
        wait_for(lambda: not spool.pending(), 60, "the MR processed")
    finally:
        node._stop.set()
        node._work.set()
        worker.join(10)
    rows = audit.list()
    assert sorted(r.action for r in rows) == ["dicom-failed", "predict"]
    failed = next(r for r in rows if r.action == "dicom-failed")
    assert failed.status == 500 and "decoder crashed" in failed.error and failed.user == "dicom:MOD1"
    assert MAX_ATTEMPTS >= 2 and len(spool.outbox()) == 1  # the MR's SR
