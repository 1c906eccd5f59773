"""Where the node sends its results: a DICOM peer by C-STORE (pynetdicom) or a DICOMweb server by STOW-RS
(dicomweb-client). ``parse_destination`` reads the ``--destination`` text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medlens.errors import ConfigError

#: C-STORE statuses that mean "stored": success and the warnings (coercion, elements discarded, ...)
STORED = frozenset({0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


class DestinationDown(Exception):
    """The destination could not be reached or refused the association: retry later."""


@dataclass(frozen=True)
class DimseDestination:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "MEDLENS"
    timeout_s: float = 30.0

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port} (C-STORE)"

    def send(self, paths: list[Path]) -> dict[Path, str | None]:
        """C-STORE each file over one association: per file None (stored) or why it was refused. Raises
        :class:`DestinationDown` when no association can be made."""
        from pydicom import dcmread
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        headers = {}
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            headers[p] = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        for sop_class, syntax in sorted(set(headers.values())):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise DestinationDown(f"{self.describe()}: no association (refused, aborted or not listening)")
        out: dict[Path, str | None] = {}
        try:
            for p in paths:
                status = assoc.send_c_store(p)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:  # no answer: the association broke
                    raise DestinationDown(f"{self.describe()}: no C-STORE response for {p.name}")
                out[p] = None if code in STORED else f"C-STORE status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return out


@dataclass(frozen=True)
class DicomwebDestination:
    url: str
    timeout_s: float = 30.0

    def describe(self) -> str:
        return f"{self.url} (STOW-RS)"

    def send(self, paths: list[Path]) -> dict[Path, str | None]:
        """STOW-RS all files in one request (dicomweb-client); the server answers for the whole set."""
        import requests
        from dicomweb_client.api import DICOMwebClient
        from pydicom import dcmread

        client = DICOMwebClient(url=self.url)
        try:
            client.store_instances(datasets=[dcmread(p) for p in paths])
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DestinationDown(f"{self.describe()}: {type(exc).__name__}") from None
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code >= 500 or code in (408, 429):
                raise DestinationDown(f"{self.describe()}: HTTP {code}") from None
            return {p: f"STOW-RS HTTP {code}" for p in paths}
        return {p: None for p in paths}


_DIMSE = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})")


def parse_destination(text: str, calling_ae_title: str = "MEDLENS") -> DimseDestination | DicomwebDestination:
    """``AET@HOST:PORT`` (C-STORE) or ``http(s)://.../dicom-web`` (STOW-RS)."""
    if text.startswith(("http://", "https://")):
        return DicomwebDestination(text.rstrip("/"))
    match = _DIMSE.fullmatch(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"destination '{text}' is neither AET@HOST:PORT nor a DICOMweb URL",
                          hint="e.g. --destination ORTHANC@127.0.0.1:4242 or https://pacs.example/dicom-web")
    return DimseDestination(match["aet"], match["host"], int(match["port"]), calling_ae_title)
