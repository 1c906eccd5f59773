"""Downloads, extraction and data-set resolution, against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import require_path

from medlens.data import download as dl
from medlens.data.download import DATASETS, DatasetSpec, NetworkError, extract, fetch, resolve_dataset
from medlens.errors import DataError

PAYLOAD = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- server


class Server:
    """Serves files from ``root``; records every request; knobs to ignore Range or cut a response short."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.honour_range = True
        self.cut_after: int | None = None  # send only this many body bytes, then close the connection
        self.base = ""

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)


def _handler(state: Server):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state.requests.append({"path": self.path, "range": self.headers.get("Range")})
            if self.path.startswith("/redirect/"):  # like Mendeley's /file_downloaded -> signed storage URL
                self.send_response(302)
                self.send_header("Location", self.path[len("/redirect") :])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = state.root / self.path.split("?")[0].lstrip("/")
            if not path.is_file():
                self.send_error(404, "Not Found")
                return
            body = path.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and state.honour_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.cut_after is not None:
                payload = payload[: state.cut_after]
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    state = Server(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for var in (
        "MEDLENS_DATA",
        "MEDLENS_OFFLINE",
        "MEDLENS_DATA_CHEST_XRAY",
        "MEDLENS_DATA_TOY",
        "MEDLENS_DATA_PNEUMONIAMNIST",
        "MEDLENS_DATA_TOYNPZ",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEDLENS_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


# ---------------------------------------------------------------------------------------------- fetch


def test_full_download_verifies_and_renames(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "out" / "file.bin"
    got = fetch(url, dest, sha256=SHA, md5=MD5, size=len(PAYLOAD), progress=False)
    assert got == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "out" / "file.bin.part").exists()
    assert len(server.requests) == 1 and server.requests[0]["range"] is None


def test_cached_second_call_makes_no_request(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    fetch(url, dest, sha256=SHA, progress=False)
    fetch(url, dest, sha256=SHA, progress=False)
    fetch(url, dest, md5=MD5, progress=False)
    assert len(server.requests) == 1


def test_cached_file_that_fails_its_checksum_is_downloaded_again(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale or corrupt")
    fetch(url, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_resume_sends_range_and_appends(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    half = len(PAYLOAD) // 2
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:half])
    fetch(url, dest, sha256=SHA, progress=False)
    assert [r["range"] for r in server.requests] == [f"bytes={half}-"]
    assert dest.read_bytes() == PAYLOAD


def test_resume_through_a_redirect_keeps_the_range_header(server, tmp_path):
    server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:1234])
    fetch(server.url("redirect/file.bin"), dest, md5=MD5, progress=False)
    assert [(r["path"], r["range"]) for r in server.requests] == [
        ("/redirect/file.bin", "bytes=1234-"),
        ("/file.bin", "bytes=1234-"),
    ]
    assert dest.read_bytes() == PAYLOAD


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    # garbage in the .part: appending the 200 body to it would fail the checksum
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)
    fetch(url, dest, sha256=SHA, progress=False)
    assert server.requests[0]["range"] == "bytes=1000-"
    assert dest.read_bytes() == PAYLOAD


def test_already_complete_part_is_verified_not_downloaded_again(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    fetch(url, dest, sha256=SHA, progress=False)  # server answers 416 bytes */N
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_cut_off_download_keeps_part_and_next_call_resumes(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    server.cut_after = 100_000
    with pytest.raises(NetworkError) as exc:
        fetch(url, dest, sha256=SHA, progress=False)
    assert "cut off" in str(exc.value) and "resume" in str(exc.value)
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not dest.exists()

    server.cut_after = None
    fetch(url, dest, sha256=SHA, progress=False)
    assert server.requests[-1]["range"] == "bytes=100000-"
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    with pytest.raises(DataError) as exc:
        fetch(url, dest, sha256=wrong, progress=False)
    msg = str(exc.value)
    assert url in msg and wrong in msg and SHA in msg and "again" in msg
    assert not dest.exists() and not (tmp_path / "file.bin.part").exists()


def test_size_mismatch_raises(server, tmp_path):
    url = server.put("file.bin", PAYLOAD)
    with pytest.raises(DataError, match="expected size"):
        fetch(url, tmp_path / "file.bin", size=len(PAYLOAD) + 1, progress=False)
    assert not (tmp_path / "file.bin").exists()


def test_server_down_gives_one_clear_error_and_keeps_part(tmp_path):
    url = _dead_url()
    dest = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    part.write_bytes(b"12345")
    with pytest.raises(NetworkError) as exc:
        fetch(url, dest, progress=False, timeout=5)
    msg = str(exc.value)
    assert isinstance(exc.value, DataError)
    assert msg.startswith(f"could not download {url}: connection refused")
    assert "resumed" in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    assert part.read_bytes() == b"12345" and not dest.exists()


def test_silent_server_times_out_with_a_clear_error(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.bin"
        with pytest.raises(NetworkError, match=r"no response within 0.3 s"):
            fetch(url, tmp_path / "slow.bin", progress=False, timeout=0.3)
    assert not (tmp_path / "slow.bin").exists()


def test_http_404_is_a_data_error_naming_the_url(server, tmp_path):
    with pytest.raises(DataError) as exc:
        fetch(server.url("missing.bin"), tmp_path / "m.bin", progress=False)
    assert not isinstance(exc.value, NetworkError)
    assert "404" in str(exc.value) and "missing.bin" in str(exc.value) and "--data" in str(exc.value)


def test_progress_bar_goes_to_stderr_only_when_enabled(server, tmp_path, capsys):
    url = server.put("file.bin", PAYLOAD)
    fetch(url, tmp_path / "a.bin", progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    fetch(url, tmp_path / "b.bin", progress=True)
    out = capsys.readouterr()
    assert "b.bin" in out.err and out.out == ""


# ---------------------------------------------------------------------------------------------- extract


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    # A fixed member date: ``writestr(name, ...)`` stamps the wall clock, so two calls that straddle a
    # two-second boundary made different bytes (a flaky checksum comparison in CI).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


@pytest.mark.parametrize("evil", ["../evil.txt", "ok/../../evil.txt", "/tmp/medlens-evil.txt"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes({"good.txt": b"fine", evil: b"pwned"}))
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(DataError, match="zip slip") as exc:
        extract(archive, dest)
    assert str(archive) in str(exc.value)
    assert not (tmp_path / "dest" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/medlens-evil.txt").exists()
    assert not (dest / "good.txt").exists() and not (dest / dl.EXTRACT_MARKER).exists()


def test_tar_with_traversal_or_outside_symlink_is_refused(tmp_path):
    for i, kind in enumerate(["dotdot", "symlink"]):
        archive = tmp_path / f"evil{i}.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            if kind == "dotdot":
                info = tarfile.TarInfo("../evil.txt")
                info.size = 5
                tf.addfile(info, io.BytesIO(b"pwned"))
            else:
                info = tarfile.TarInfo("link")
                info.type = tarfile.SYMTYPE
                info.linkname = "../../outside"
                tf.addfile(info)
        with pytest.raises(DataError, match="zip slip"):
            extract(archive, tmp_path / f"dest{i}")
        assert not (tmp_path / "evil.txt").exists()
        assert not (tmp_path / f"dest{i}" / "link").exists()


def test_extract_writes_marker_skips_when_done_and_redoes_interrupted(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(
        _zip_bytes({"d/x.txt": b"hello", "d/sub/y.txt": b"world", "__MACOSX/d/._x.txt": b"junk"})
    )
    dest = tmp_path / "out"
    assert extract(archive, dest) == dest
    assert (dest / "d" / "x.txt").read_bytes() == b"hello"
    assert (dest / "d" / "sub" / "y.txt").read_bytes() == b"world"
    assert not (dest / "__MACOSX").exists()
    marker = json.loads((dest / dl.EXTRACT_MARKER).read_text())
    assert marker["archive"] == "a.zip" and marker["size"] == archive.stat().st_size

    (dest / "d" / "x.txt").write_bytes(b"he")  # complete extraction: a second call does not touch files
    extract(archive, dest)
    assert (dest / "d" / "x.txt").read_bytes() == b"he"

    (dest / dl.EXTRACT_MARKER).unlink()  # as if interrupted before the marker was written
    extract(archive, dest)
    assert (dest / "d" / "x.txt").read_bytes() == b"hello"
    assert (dest / dl.EXTRACT_MARKER).is_file()


def test_extract_tar_gz_and_reject_non_archive(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("top/file.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    extract(archive, tmp_path / "o")
    assert (tmp_path / "o" / "top" / "file.txt").read_bytes() == b"abc"

    html = tmp_path / "error.zip"
    html.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        extract(html, tmp_path / "o2")


# ---------------------------------------------------------------------------------------------- datasets


def _make_folder_dataset(folder: Path) -> Path:
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            (folder / split / label / "a.jpeg").write_bytes(b"\xff\xd8fake")
    return folder


def _toy_zip() -> bytes:
    return _zip_bytes(
        {
            "chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"\xff\xd8n",
            "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": b"\xff\xd8p",
            "chest_xray/test/NORMAL/IM-0002-0001.jpeg": b"\xff\xd8n2",
            "chest_xray/test/PNEUMONIA/person2_virus_3.jpeg": b"\xff\xd8p2",
            "__MACOSX/chest_xray/._train": b"junk",
        }
    )


def _toy_registry(url: str) -> dict[str, DatasetSpec]:
    spec = DatasetSpec(
        name="toy",
        url=url,
        filename="Toy.zip",
        layout_note="train/ test/ NORMAL|PNEUMONIA",
        extract=True,
        root_markers=("train", "test"),
    )
    return {"toy": spec}


def test_registry_entries_use_the_published_values():
    pm = DATASETS["pneumoniamnist"]
    assert pm.url == "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
    assert pm.md5 == "28209eda62fecd6e6a2d98b1501bb15f" and pm.extract is False
    cx = DATASETS["chest_xray"]
    assert cx.filename == "ChestXRay2017.zip" and cx.extract and cx.root_markers == ("train", "test")
    assert cx.sha256 is None and cx.md5 is None  # none published: trust on first use
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.url.startswith("https://") and spec.licence


def test_download_extract_and_trust_on_first_use(server, tmp_path):
    registry = _toy_registry(server.put("Toy.zip", _toy_zip()))
    cache = tmp_path / "cache"
    kw = dict(registry=registry, cache_dir=cache, search_from=tmp_path, progress=False)

    root = resolve_dataset("toy", **kw)
    assert root == cache / "toy" / "chest_xray"
    assert (root / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg").read_bytes() == b"\xff\xd8p"
    recorded = json.loads((cache / "checksums.json").read_text())["toy"]
    assert recorded["sha256"] == hashlib.sha256(_toy_zip()).hexdigest()
    assert recorded["size"] == len(_toy_zip())

    assert resolve_dataset("toy", **kw) == root  # cached: no request
    assert len(server.requests) == 1

    # The file on the server changes: a fresh download must fail against the recorded checksum.
    changed = bytearray(_toy_zip())
    changed[len(changed) // 2] ^= 0xFF  # same size, different content
    server.put("Toy.zip", bytes(changed))
    (cache / "toy" / dl.EXTRACT_MARKER).unlink()
    (cache / dl.DOWNLOADS_DIR / "Toy.zip").unlink()
    with pytest.raises(DataError) as exc:
        resolve_dataset("toy", **kw)
    msg = str(exc.value)
    assert msg.startswith("checksum mismatch for Toy.zip")
    assert (
        recorded["sha256"] in msg and hashlib.sha256(changed).hexdigest() in msg and "checksums.json" in msg
    )
    assert not (cache / dl.DOWNLOADS_DIR / "Toy.zip").exists()


def test_single_file_dataset_download_is_checked(server, tmp_path):
    url = server.put("toy.npz", PAYLOAD)
    registry = {"toynpz": DatasetSpec(name="toynpz", url=url, filename="toy.npz", md5=MD5)}
    kw = dict(registry=registry, cache_dir=tmp_path / "c", search_from=tmp_path, progress=False)
    path = resolve_dataset("toynpz", **kw)
    assert path == tmp_path / "c" / "toynpz" / "toy.npz" and path.read_bytes() == PAYLOAD
    assert resolve_dataset("toynpz", **kw) == path and len(server.requests) == 1
    assert not (tmp_path / "c" / "checksums.json").exists()  # a published md5 needs no TOFU record


def test_explicit_path_wins_and_must_exist(tmp_path, monkeypatch):
    explicit = _make_folder_dataset(tmp_path / "mine" / "chest_xray")
    monkeypatch.setenv("MEDLENS_DATA_CHEST_XRAY", str(_make_folder_dataset(tmp_path / "env" / "chest_xray")))
    assert resolve_dataset("chest_xray", data_arg=str(explicit), search_from=tmp_path) == explicit
    # a parent of the nested data folder is accepted too
    assert resolve_dataset("chest_xray", data_arg=str(tmp_path / "mine"), search_from=tmp_path) == explicit
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        resolve_dataset("chest_xray", data_arg=str(missing), search_from=tmp_path)


@pytest.fixture
def search_only_inside_tmp(tmp_path, monkeypatch):
    """The upward search for shared/data must not escape the test's folder: a real shared/ above the
    temporary directory (a CI clone in /tmp with /tmp/shared beside it) would otherwise be found."""
    real = dl._shared_data_roots
    monkeypatch.setattr(dl, "_shared_data_roots",
                        lambda search_from: [r for r in real(search_from) if r.is_relative_to(tmp_path)])


def test_env_vars_then_shared_then_cache(tmp_path, monkeypatch, search_only_inside_tmp):
    offline = dict(offline=True, cache_dir=tmp_path / "cache")
    repo = tmp_path / "work" / "main"
    repo.mkdir(parents=True)
    shared = _make_folder_dataset(tmp_path / "work" / "shared" / "data" / "chest_xray")
    specific = _make_folder_dataset(tmp_path / "specific")
    data_root = tmp_path / "root"
    in_root = _make_folder_dataset(data_root / "chest_xray")

    monkeypatch.setenv("MEDLENS_DATA_CHEST_XRAY", str(specific))
    monkeypatch.setenv("MEDLENS_DATA", str(data_root))
    assert resolve_dataset("chest_xray", search_from=repo / "src", **offline) == specific
    monkeypatch.delenv("MEDLENS_DATA_CHEST_XRAY")
    assert resolve_dataset("chest_xray", search_from=repo / "src", **offline) == in_root
    monkeypatch.delenv("MEDLENS_DATA")
    assert resolve_dataset("chest_xray", search_from=repo / "src", **offline) == shared

    # nothing local: an extracted cache copy (marker present) is used without any network
    cached = _make_folder_dataset(tmp_path / "cache" / "chest_xray" / "chest_xray")
    (tmp_path / "cache" / "chest_xray" / dl.EXTRACT_MARKER).write_text("{}")
    assert resolve_dataset("chest_xray", search_from=tmp_path / "elsewhere", **offline) == cached

    monkeypatch.setenv("MEDLENS_DATA_CHEST_XRAY", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="MEDLENS_DATA_CHEST_XRAY"):
        resolve_dataset("chest_xray", search_from=repo, **offline)


def test_offline_message_says_what_to_do(tmp_path, monkeypatch, search_only_inside_tmp):
    monkeypatch.setenv("MEDLENS_OFFLINE", "1")
    with pytest.raises(DataError) as exc:
        resolve_dataset("chest_xray", data_arg=None, cache_dir=tmp_path / "c", search_from=tmp_path)
    msg = exc.value.message
    assert msg.startswith("chest_xray not found and it cannot be downloaded (offline mode")
    assert "--data /path/to/chest_xray" in msg and "NORMAL|PNEUMONIA" in msg
    assert "MEDLENS_DATA=/path/containing/chest_xray" in msg
    assert "`medlens data fetch chest_xray`" in msg and str(tmp_path / "c" / "chest_xray") in msg


def test_unreachable_download_gives_the_same_single_message(tmp_path, search_only_inside_tmp):
    registry = _toy_registry(_dead_url())
    with pytest.raises(DataError) as exc:
        resolve_dataset(
            "toy",
            registry=registry,
            cache_dir=tmp_path / "c",
            search_from=tmp_path,
            offline=False,
            progress=False,
            timeout=5,
        )
    msg = exc.value.message
    assert "toy not found and it cannot be downloaded (no network: connection refused)" in msg
    assert "--data" in msg and "MEDLENS_DATA" in msg and "medlens data fetch toy" in msg
    assert not isinstance(exc.value, NetworkError)


def test_unknown_dataset_is_a_config_error(tmp_path):
    from medlens.errors import ConfigError

    with pytest.raises(ConfigError, match="chest_xray"):
        resolve_dataset("nope", search_from=tmp_path, offline=True)


def test_real_shared_copy_is_found_from_the_repository(tmp_path):
    # CI checks the project out with the data beside it: missing there is a failure, elsewhere a skip
    require_path(REPO.parent / "shared" / "data" / "chest_xray" / "train", "../shared/data/chest_xray beside the repository")
    got = resolve_dataset("chest_xray", search_from=REPO / "src", cache_dir=tmp_path, offline=True)
    assert got.resolve() == (REPO.parent / "shared" / "data" / "chest_xray").resolve()
    assert (got / "test" / "PNEUMONIA").is_dir()
