"""read_image / is_image_file: real DICOM and chest X-ray files, synthetic Pillow modes, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import require_module, require_shared
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medlens.data.readers import HAS_NIBABEL, IMAGE_SUFFIXES, is_image_file, read_image
from medlens.errors import DataError

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
KERMANY_JPEG = "chest_xray/train/NORMAL/IM-0115-0001.jpeg"


@pytest.fixture(scope="module")
def shared() -> Path:
    """The real-data folder; its absence fails CI loudly and skips elsewhere."""
    return require_shared()


def _check_image(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.float32
    assert image.shape == shape
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05, "image is (nearly) constant: pixels were lost"


# --------------------------------------------------------------------------- real DICOM files

DICOMS = [  # file, shape, modality, photometric, bits, transfer syntax, window, patient id
    (
        "RG1_J2KI.dcm",
        (1955, 1841),
        "CR",
        "MONOCHROME1",
        15,
        "1.2.840.10008.1.2.4.91",
        (15000.0, 30000.0),
        "9RG1",
    ),
    (
        SIIM,
        (1024, 1024),
        "CR",
        "MONOCHROME2",
        8,
        "1.2.840.10008.1.2.4.50",
        None,
        "16d7f894-55d7-4d95-8957-d18987f0e981",
    ),
    ("CT_small.dcm", (128, 128), "CT", "MONOCHROME2", 16, "1.2.840.10008.1.2.1", None, "1CT1"),
    ("MR_small.dcm", (64, 64), "MR", "MONOCHROME2", 16, "1.2.840.10008.1.2.1", (600.0, 1600.0), "4MR1"),
]


@pytest.mark.parametrize(("name", "shape", "modality", "photometric", "bits", "ts", "window", "pid"), DICOMS)
def test_dicom_files(shared, name, shape, modality, photometric, bits, ts, window, pid):
    image, meta = read_image(shared / "dicom" / name)
    _check_image(image, shape)
    assert meta["format"] == "dicom"
    assert meta["shape"] == shape
    assert (meta["modality"], meta["photometric"], meta["bits"]) == (modality, photometric, bits)
    assert meta["transfer_syntax"] == ts
    assert meta["window"] == window
    assert meta["patient_id"] == pid
    assert meta["study_uid"].startswith("1.")
    assert "frames" not in meta


def test_monochrome1_chest_is_shown_with_dark_lungs(shared):
    """RG1 is a PA chest: after MONOCHROME1 inversion the lungs must be darker than the mediastinum."""
    image, _ = read_image(shared / "dicom" / "RG1_J2KI.dcm")
    h, w = image.shape
    lungs = [
        image[int(0.35 * h) : int(0.55 * h), int(a * w) : int(b * w)].mean()
        for a, b in ((0.2, 0.35), (0.65, 0.8))
    ]
    mediastinum = image[int(0.3 * h) : int(0.6 * h), int(0.45 * w) : int(0.55 * w)].mean()
    assert max(lungs) + 0.15 < mediastinum


def test_monochrome1_is_the_inverse_of_the_same_pixels_read_as_monochrome2(shared, tmp_path):
    ds = pydicom.dcmread(shared / "dicom" / "RG1_J2KI.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"  # header only; the JPEG 2000 stream is kept as is
    ds.save_as(tmp_path / "rg1_mono2.dcm")
    mono1, _ = read_image(shared / "dicom" / "RG1_J2KI.dcm")
    mono2, meta = read_image(tmp_path / "rg1_mono2.dcm")
    assert meta["photometric"] == "MONOCHROME2"
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


@pytest.mark.parametrize(("name", "inverted"), [("RG1_J2KI.dcm", True), ("MR_small.dcm", False)])
def test_window_maps_to_full_range_not_data_range(shared, name, inverted):
    """DICOM linear window (PS3.3 C.11.2.1.2): y = (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]."""
    ds = pydicom.dcmread(shared / "dicom" / name)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((ds.pixel_array.astype(np.float64) - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    image, meta = read_image(shared / "dicom" / name)
    assert meta["voi"] == "window"
    np.testing.assert_allclose(image, 1 - expected if inverted else expected, atol=1e-4)


def test_no_window_scales_rescaled_values_over_the_data(shared):
    ds = pydicom.dcmread(shared / "dicom" / "CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image, meta = read_image(shared / "dicom" / "CT_small.dcm")
    assert meta["voi"] == "none"
    np.testing.assert_allclose(image, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT (here y = 10 x for x < 2200) wins over the window and is scaled over the LUT's output range."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [2200, 0, 16]
    item.add_new(0x00283006, "US", [10 * i for i in range(2200)])  # LUTData
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "vlut.dcm")
    image, meta = read_image(tmp_path / "vlut.dcm")
    assert meta["voi"] == "lut"
    np.testing.assert_allclose(image, np.clip(ds.pixel_array, 0, 2199) / 2199, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "shape", "frames"),
    [
        ("rtdose.dcm", (10, 10), 15),  # 32-bit, multi-frame
        ("examples_ybr_color.dcm", (240, 320), 30),  # colour ultrasound, JPEG baseline, multi-frame
        ("examples_palette.dcm", (350, 800), None),  # PALETTE COLOR
        ("SC_rgb_rle.dcm", (100, 100), None),  # RGB, RLE
        ("JPEGLSNearLossless_16.dcm", (50, 10), None),  # JPEG-LS via pylibjpeg-libjpeg
    ],
)
def test_other_dicom_kinds_become_one_grey_frame(name, shape, frames):
    image, meta = read_image(get_testdata_file(name))
    assert image.dtype == np.float32 and image.shape == shape
    assert 0.0 <= image.min() < image.max() <= 1.0
    assert meta.get("frames") == frames


def test_multiframe_reads_frame_zero():
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    first = ds.pixel_array[0].astype(np.float64)
    image, meta = read_image(get_testdata_file("rtdose.dcm"))
    assert "frame 0" in meta["note"]
    np.testing.assert_allclose(image, (first - first.min()) / (first.max() - first.min()), atol=1e-6)


def test_dicom_without_suffix_is_detected_and_read(shared, tmp_path):
    for target in (tmp_path / "IMG0001", tmp_path / "1.2.840.113619.2.55"):
        shutil.copy(shared / "dicom" / "MR_small.dcm", target)
        assert is_image_file(target)
        image, meta = read_image(target)
        assert meta["format"] == "dicom" and image.shape == (64, 64)


def test_missing_decoder_names_the_transfer_syntax_and_the_package(shared, monkeypatch):
    decoders = require_module("pydicom.pixels")  # pydicom 3 (a declared dependency): never skipped in CI
    decoder = decoders.get_decoder("1.2.840.10008.1.2.4.91")
    monkeypatch.setattr(decoder, "_available", {})  # as if pylibjpeg/openjpeg and Pillow's J2K were absent
    with pytest.raises(DataError) as err:
        read_image(shared / "dicom" / "RG1_J2KI.dcm")
    assert "RG1_J2KI.dcm" in err.value.message
    assert (
        "JPEG 2000 Image Compression" in err.value.message and "1.2.840.10008.1.2.4.91" in err.value.message
    )
    assert err.value.hint == "pip install pylibjpeg pylibjpeg-openjpeg"


# --------------------------------------------------------------------------- Pillow formats


def test_kermany_jpeg(shared):
    path = shared / KERMANY_JPEG
    image, meta = read_image(path)
    _check_image(image, (224, 224))
    assert meta == {"format": "jpeg", "shape": (224, 224), "bits": 8}
    rgb = np.asarray(Image.open(path))
    assert (rgb[..., 0] == rgb[..., 2]).all()  # stored R = G = B: one channel is taken exactly
    np.testing.assert_array_equal(image, rgb[..., 0].astype(np.float32) / 255)


RAMP8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64
RAMP16 = RAMP8.astype(np.uint16) * 257


def _palette_image() -> Image.Image:
    img = Image.fromarray(RAMP8 // 4, mode="L").convert("P")
    img.putpalette([v for i in range(256) for v in (255 - i, 255 - i, 255 - i)])  # index i -> grey 255 - i
    return img


def _rgb(r: float, g: float, b: float) -> Image.Image:
    return Image.fromarray(np.stack([RAMP8 * r, RAMP8 * g, RAMP8 * b], -1).astype(np.uint8), mode="RGB")


PILLOW_CASES = [  # id, suffix, image factory, expected array, expected bits
    ("png-16bit", ".png", lambda: Image.fromarray(RAMP16), RAMP16 / 65535, 16),
    ("tiff-16bit", ".tif", lambda: Image.fromarray(RAMP16), RAMP16 / 65535, 16),
    ("png-8bit", ".png", lambda: Image.fromarray(RAMP8), RAMP8 / 255, 8),
    ("bmp-8bit", ".bmp", lambda: Image.fromarray(RAMP8), RAMP8 / 255, 8),
    ("png-rgb-grey", ".png", lambda: _rgb(1, 1, 1), RAMP8 / 255, 8),
    (
        "png-rgb-colour",
        ".png",
        lambda: _rgb(1, 0.5, 0),
        (0.299 * RAMP8 + 0.587 * (RAMP8 * 0.5).astype(np.uint8)) / 255,
        8,
    ),
    ("png-rgba", ".png", lambda: _rgb(1, 1, 1).convert("RGBA"), RAMP8 / 255, 8),
    ("png-la", ".png", lambda: Image.fromarray(RAMP8).convert("LA"), RAMP8 / 255, 8),
    ("png-palette", ".png", _palette_image, (255 - RAMP8 // 4) / 255, 8),
    ("png-1bit", ".png", lambda: Image.fromarray(RAMP8 >= 128), (RAMP8 >= 128).astype(float), 1),
]


@pytest.mark.parametrize(
    ("suffix", "make", "expected", "bits"), [c[1:] for c in PILLOW_CASES], ids=[c[0] for c in PILLOW_CASES]
)
def test_pillow_modes(tmp_path, suffix, make, expected, bits):
    path = tmp_path / f"img{suffix}"
    make().save(path)
    image, meta = read_image(path)
    assert image.dtype == np.float32 and image.shape == (16, 64)
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert meta["bits"] == bits and meta["shape"] == (16, 64)
    assert meta["format"] == {".tif": "tiff"}.get(suffix, suffix[1:])


def test_16bit_is_scaled_by_bit_depth_not_by_its_own_max(tmp_path):
    dark = np.full((8, 8), 1000, dtype=np.uint16)
    dark[0, 0] = 4000
    Image.fromarray(dark).save(tmp_path / "dark.png")
    image, _ = read_image(tmp_path / "dark.png")
    assert image.max() == pytest.approx(4000 / 65535)


def test_nifti_middle_slice(tmp_path):
    nib = require_module("nibabel", extra="nifti")  # in the nifti and dev extras: CI has it
    assert HAS_NIBABEL

    volume = np.random.default_rng(0).random((20, 30, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    image, meta = read_image(tmp_path / "vol.nii.gz")
    expected = np.flipud(volume[:, :, 4].T)
    np.testing.assert_allclose(
        image, (expected - expected.min()) / (expected.max() - expected.min()), atol=1e-6
    )
    assert meta["format"] == "nifti" and meta["shape"] == (30, 20) and "middle slice 4" in meta["note"]


# --------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def _truncated_jpeg(tmp_path: Path, shared: Path) -> Path:
    data = (shared / KERMANY_JPEG).read_bytes()
    return _write(tmp_path, "cut.jpeg", data[: len(data) // 2])


def _truncated_png(tmp_path: Path, _shared: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        tmp_path / "f.png"
    )
    return _write(tmp_path, "cut.png", (tmp_path / "f.png").read_bytes()[:600])


BAD_INPUTS = [  # id, make(tmp_path, shared) -> path, expected problem text
    ("empty", lambda t, s: _write(t, "empty.png", b""), "is empty (0 bytes)"),
    ("truncated-jpeg", _truncated_jpeg, "is truncated or corrupt"),
    ("truncated-png", _truncated_png, "is truncated or corrupt"),
    ("text-as-png", lambda t, s: _write(t, "notes.png", b"patient list\nfoo,bar\n"), "is not an image: "),
    ("html-as-jpg", lambda t, s: _write(t, "page.jpg", b"<!DOCTYPE html><html>404</html>"), "an HTML page"),
    (
        "lfs-pointer",
        lambda t, s: _write(t, "x.png", b"version https://git-lfs.github.com/spec/v1\n"),
        "Git LFS",
    ),
    ("unsupported", lambda t, s: _write(t, "scan.gif", b"GIF89a"), "unsupported file type '.gif'"),
    ("missing", lambda t, s: t / "nowhere.png", "does not exist"),
    ("directory", lambda t, s: (t / "dir.png").mkdir() or t / "dir.png", "is a directory"),
    (
        "text-as-dcm",
        lambda t, s: _write(t, "text.dcm", b"hello, not a DICOM file\n" * 4),
        "is not a DICOM file",
    ),
    (
        "dicom-report",
        lambda t, s: Path(shutil.copy(get_testdata_file("reportsi.dcm"), t / "sr.dcm")),
        "has no pixel data (PixelData element missing) — it may be a structured report or presentation state",
    ),
    (
        "dicom-truncated",
        lambda t, s: Path(shutil.copy(get_testdata_file("MR_truncated.dcm"), t / "mr.dcm")),
        "pixel data cannot be decoded",
    ),
]


@pytest.mark.parametrize(("make", "problem"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_one_line_data_error(tmp_path, shared, make, problem):
    path = make(tmp_path, shared)
    with pytest.raises(DataError) as err:
        read_image(path)
    message = err.value.message
    assert str(path) in message and problem in message
    assert "\n" not in message
    assert err.value.hint


# --------------------------------------------------------------------------- is_image_file


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.png", b"", True),
        ("A.JPEG", b"", True),
        ("b.TIFF", b"", True),
        ("c.dicom", b"", True),
        ("d.nii.gz", b"", HAS_NIBABEL),
        ("._a.jpeg", b"\x00\x05\x16\x07", False),  # macOS resource fork
        ("notes.txt", b"hello", False),
        ("scan.gif", b"GIF89a", False),
        ("IMG0001", b"\0" * 128 + b"DICM" + b"\0" * 16, True),
        ("1.2.840.55", b"\0" * 128 + b"DICM", True),
        ("README", b"just text, long enough to pass byte 128 " * 5, False),
    ],
)
def test_is_image_file(tmp_path, name, content, expected):
    assert is_image_file(_write(tmp_path, name, content)) is expected


def test_image_suffixes_contract():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"} <= IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
    assert (".nii.gz" in IMAGE_SUFFIXES) is HAS_NIBABEL


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "CT_small.dcm"])
def test_dicom_read_from_memory_matches_the_file(shared, name):
    from medlens.data.readers import read_image_bytes

    path = shared / "dicom" / name
    image, meta = read_image(path)
    mem, mem_meta = read_image_bytes(path.read_bytes(), "dicom", name="upload.dcm")
    assert np.array_equal(image, mem) and mem_meta == meta


def test_pillow_read_from_memory_matches_the_file_and_names_the_upload(shared, tmp_path):
    from medlens.data.readers import read_image_bytes

    jpeg = next((shared / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))
    image, meta = read_image(jpeg, reduce_to=64)
    mem, mem_meta = read_image_bytes(jpeg.read_bytes(), "jpeg", reduce_to=64)
    assert np.array_equal(image, mem) and mem_meta == meta and meta.get("reduced", 1) > 1
    png = tmp_path / "x.png"
    Image.fromarray((np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)).save(png)
    assert np.array_equal(read_image(png)[0], read_image_bytes(png.read_bytes(), "png")[0])
    with pytest.raises(DataError, match=r"^upload 7: is truncated or corrupt"):
        read_image_bytes(png.read_bytes()[:60], "png", name="upload 7")
    with pytest.raises(DataError, match=r"^upload 7: is not an image: an HTML page"):
        read_image_bytes(b"<html><body>error</body></html>", "png", name="upload 7")
