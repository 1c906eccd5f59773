"""A real PACS for the DICOM node's tests and benchmark: Debian's Orthanc (with its DICOMweb plugin) started as a
subprocess with a throwaway configuration on loopback ports, dcmtk's ``storescu`` to send it studies, and the
``medlens dicom listen`` node as a subprocess.

Orthanc's REST API is used the way a PACS administrator would: ``/modalities/medlens/store`` routes a study to
the node, and ``/studies/{id}/series`` shows what came back. Without Orthanc or dcmtk the tests fail under
``CI=true`` (``.ci/run`` installs them) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers import _missing, free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# storescu proposes uncompressed transfer syntaxes unless told: the option for each compressed syntax
STORESCU_SYNTAX = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
                   "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.80": "-xt",
                   "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr"}


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def require_pacs_tools() -> None:
    for tool in ("Orthanc", "storescu"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed (apt-get install orthanc orthanc-dicomweb dcmtk)")
    if not DICOMWEB_PLUGIN.exists():
        _missing(f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)")


class Orthanc:
    """An Orthanc server in ``root`` (storage kept across :meth:`stop` / :meth:`start`, like a PACS restart)."""

    def __init__(self, root: Path, node_port: int, *, aet: str = "ORTHANC"):
        self.root, self.aet = root, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = root / "orthanc.json"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "medlens-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": {"medlens": ["MEDLENS", "127.0.0.1", node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "UnknownSopClassAccepted": True, "DicomAlwaysAllowStore": True,
            "DicomAssociationCloseDelay": 0,
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - the server writes to it until stopped
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer on its HTTP port in time")

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read() or b"null")

    def delete(self, path: str) -> None:
        req = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()

    def store(self, files: list[Path]) -> None:
        """Send files to this Orthanc with dcmtk's storescu."""
        storescu(files, self.dicom_port, self.aet)

    def studies(self) -> list[dict[str, Any]]:
        return [self.get(f"/studies/{s}") for s in self.get("/studies")]

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def instance_file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=30) as resp:
            return resp.read()


def storescu(files: list[Path], port: int, aec: str, calling: str = "STORESCU") -> None:
    """Send files with dcmtk's storescu, proposing each file's own transfer syntax; RuntimeError on a failure."""
    import pydicom

    for f in files:
        syntax = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        cmd = ["storescu", "-v", *([STORESCU_SYNTAX[syntax]] if syntax in STORESCU_SYNTAX else []), "-aet", calling,
               "-aec", aec, "127.0.0.1", str(port), str(f)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0 or "E:" in out.stderr:
            raise RuntimeError(f"storescu {f.name} to {aec} failed: {(out.stdout + out.stderr)[-1000:]}")


def send_to_node(files: list[Path], port: int, aet: str = "MEDLENS", calling: str = "STORESCU") -> None:
    """storescu straight to the node (the PACS is down, or a modality sends directly)."""
    storescu(files, port, aet, calling)


class Node:
    """``medlens dicom listen`` as a subprocess (so it can be killed with SIGKILL and restarted)."""

    def __init__(self, run: Path, root: Path, destination: str, *, port: int | None = None, extra: tuple = ()):
        self.run, self.root, self.destination = run, root, destination
        self.port = port or free_port()
        self.spool, self.db = root / "spool", root / "audit.db"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 60.0) -> Node:
        log = open(self.root / "node.log", "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "medlens.cli", "-v", "dicom", "listen", str(self.run), "--port", str(self.port),
               "--destination", self.destination, "--spool", str(self.spool), "--db", str(self.db),
               "--max-backoff", "2", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited: {(self.root / 'node.log').read_text()[-2000:]}")
            if "listening on" in (self.root / "node.log").read_text():
                return self
            time.sleep(0.2)
        raise RuntimeError("the node did not start in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        terminate(self.proc, 30)
        self.proc = None

    def log(self) -> str:
        return (self.root / "node.log").read_text()


def wait_for(check, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``check()`` until it returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def result_series(orthanc: Orthanc, study_id: str) -> dict[str, int]:
    """Modality -> instance count of the series of a study in Orthanc."""
    counts: dict[str, int] = {}
    for s in orthanc.series_of(study_id):
        modality = s["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(s["Instances"])
    return counts
