"""A deterministic corpus of hostile inputs for swssl-infer, with the result each one must get.

`build_corpus(folder)` writes every file into `folder` (no network, same bytes for the same seed)
and returns one `Case` per input: hostile file names on valid images, corrupt and truncated files
of every supported format, pixel bombs, NaN/inf data, a huge sparse array, non-regular files and
command-line arguments that match nothing. Clean images under plain names (`control=True`) are
there to show that the hostile ones around them change nothing.

Run it by hand to look at the corpus: python tests/hostile.py FOLDER
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 128, 96  # the tiny run's geometry: images of this size are scored as they are
PLAIN = b"plain-control.png"  # the pixels every hostile-name case copies


@dataclass(frozen=True)
class Case:
    """One input and the row(s) it must get."""

    name: bytes  # the file name (or, with `argument`, the command-line argument) as bytes
    status: str  # "ok" | "error" | "empty"; of the "volume" row for a multi-frame file
    why: str  # one line: what the case is (named in assertion messages)
    message: str | None = None  # a case-insensitive regex for the message of its rows that are not ok
    frames: tuple[str, ...] | None = None  # multi-frame: the status of each frame's row (then a "volume" row too)
    same_as: bytes | None = None  # a case with the same pixels under a plain name: the scores must be equal
    control: bool = False  # a clean image: scored exactly as in a clean run of the controls alone
    argument: bool = False  # no file: an argument that matches nothing, given relative to `folder`


# --- pixels and files ----------------------------------------------------------------------------


def normal_image(rng: np.random.Generator, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """A smooth textured "normal" image in [0, 1] (the same recipe as tests/test_infer.py)."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    smooth = 0.35 + 0.1 * np.sin(y / 9.0 + rng.random() * 6) * np.cos(x / 11.0)
    return np.clip(smooth + 0.02 * rng.normal(size=smooth.shape), 0, 1)


def png16(image: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of `image` (floats in [0, 1])."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg8(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(rng: np.random.Generator, side: int = 10000, rows: int = 4) -> bytes:
    """A well-formed PNG (valid chunks and CRCs) whose IHDR says side x side but whose IDAT holds `rows` rows."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    data = b"".join(b"\0" + rng.integers(0, 256, side, dtype=np.uint8).tobytes() for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(data))
            + _png_chunk(b"IEND", b""))


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def sparse_npy(path: Path, shape: tuple[int, int] = (16000, 16000)) -> None:
    """A uint8 .npy of `shape` holding only zeros, as a sparse file: the header, then a hole to full size."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
        handle.truncate(handle.tell() + int(np.prod(shape)))


def tiff_bytes(array: np.ndarray, **options) -> bytes:
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, metadata=None, **options)
    return buffer.getvalue()


def tiff_claiming(width: int, height: int) -> bytes:
    """A tiny tiled little-endian TIFF whose ImageWidth/ImageLength tags are patched to width x height."""
    data = bytearray(tiff_bytes(np.full((32, 32), 100, np.uint8), tile=(16, 16)))
    assert data[:4] == b"II*\x00", "tifffile wrote no classic little-endian TIFF"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    patched = set()
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: make them LONG with the claimed value
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
            patched.add(tag)
    assert patched == {256, 257}, "no ImageWidth/ImageLength tags to patch"
    return bytes(data)


def dicom_bytes(frames: np.ndarray, seed: str) -> bytes:
    """A (multi-frame) 16-bit MONOCHROME2 explicit-VR DICOM, like write_volume in tests/test_infer.py,
    with UIDs derived from `seed` so the bytes are the same every time."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = frames.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_with_fragment(source: str, change) -> bytes | None:
    """pydicom's test file `source` with its single compressed frame replaced by change(frame) and
    re-encapsulated (a structurally valid file); None when the test file is not installed."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_frames

    try:
        path = get_testdata_file(source, download=False)
    except Exception:
        return None
    if path is None:
        return None
    ds = pydicom.dcmread(path)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([change(frame)])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _patch_length(data: bytes, tag: bytes, vr: bytes, length: int) -> bytes:
    """Explicit-VR-LE element `tag` (4 bytes, group then element) with its 2-byte length set to `length`."""
    at = data.index(tag + vr)
    return data[:at + 6] + struct.pack("<H", length) + data[at + 8:]


# --- the corpus ----------------------------------------------------------------------------------


def build_corpus(folder: Path, rng_seed: int = 0) -> list[Case]:
    """Write the hostile corpus into `folder` (created if needed) and return its cases, in a fixed order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = os.fsencode(folder)
    rng = np.random.default_rng(rng_seed)
    cases: list[Case] = []

    def put(name: bytes, content: bytes, status: str, why: str, message: str | None = None, **extra) -> None:
        with open(os.path.join(base, name), "wb") as handle:
            handle.write(content)
        cases.append(Case(name, status, why, message, **extra))

    # Controls: clean images under plain names, each format once.
    plain = normal_image(rng)
    plain_png = png16(plain)
    put(PLAIN, plain_png, "ok", "control: a clean 16-bit PNG", control=True)
    put(b"control-grey.png", png16(np.full((HEIGHT, WIDTH), 0.5)), "ok",
        "control: a constant mid-grey PNG (foreground, no texture)", control=True)
    jpeg = jpeg8(normal_image(rng))
    put(b"control.jpg", jpeg, "ok", "control: a clean 8-bit JPEG", control=True)
    tif = tiff_bytes((normal_image(rng) * 65535).astype(np.uint16), tile=(32, 32))
    put(b"control.tif", tif, "ok", "control: a clean tiled 16-bit TIFF", control=True)
    dicom = dicom_bytes((normal_image(rng)[None] * 65535).astype(np.uint16), "control")
    put(b"control.dcm", dicom, "ok", "control: a clean single-frame DICOM", control=True)

    # Hostile names on valid images: the same pixels as the plain control, so the same score.
    names = [
        (b"bad-utf8-\xff\xfe-name.png", "a name that is not UTF-8"),
        (b"carriage\rreturn.png", "a carriage return in the name"),
        (b"new\nline.png", "a newline in the name"),
        (b"crlf\r\n=1+1.png", "CR LF then a formula in the name"),
        (b"tab\tname.png", "a tab in the name"),
        (b"\tstarts-with-tab.png", "a name starting with a tab"),
        (b"esc-\x1b[2J-clear.png", "an ANSI clear-screen sequence in the name"),
        (b"esc-\x1b]0;title\x07-osc.png", "an OSC set-title sequence (ESC ... BEL) in the name"),
        (b"=HYPERLINK(1).png", "a name starting with '=' (a spreadsheet formula)"),
        (b"+plus.png", "a name starting with '+'"),
        (b"-dash.png", "a name starting with '-' (also an option to a naive parser)"),
        (b"@at.png", "a name starting with '@'"),
        (b"quote\"s,and'commas.png", "double and single quotes and a comma in the name"),
        (b"L" * 196 + b".png", "a 200-character name"),
        ("ελληνικά-漢字.png".encode(), "a Greek and CJK (UTF-8) name"),
        (b" spaces in  the name .png", "leading, double and inner spaces in the name"),
        (b"glob-[a]-*?.png", "glob characters in the name of a file that exists"),
    ]
    for name, why in names:
        put(name, plain_png, "ok", f"hostile name: {why}", same_as=PLAIN)
    os.symlink(PLAIN, os.path.join(base, b"link-to-control.png"))
    cases.append(Case(b"link-to-control.png", "ok", "a symlink to a valid image", same_as=PLAIN))

    # Corrupt PNG / JPEG.
    put(b"empty-file.png", b"", "error", "an empty (0-byte) .png")
    put(b"random-bytes.png", rng.bytes(2048), "error", "random bytes named .png")
    put(b"png-cut-in-half.png", plain_png[:len(plain_png) // 2], "error", "a PNG cut in half")
    put(b"png-bomb-10000x10000.png", png_bomb(rng), "error",
        "a valid-chunk PNG whose IHDR says 10000 x 10000 but whose IDAT holds 4 rows")
    put(b"jpeg-cut-in-half.jpg", jpeg[:len(jpeg) // 2], "error", "a JPEG cut in half")
    put(b"text-file.jpg", b"this is a text file, not a JPEG\n" * 8, "error", "a text file named .jpg")
    # Errors whose names hold control characters: the failure lists must show them escaped.
    put(b"corrupt-\x1b[31mred-\x07bel.png", rng.bytes(600), "error",
        "random bytes under a name with ESC and BEL (printed in the failure list)")
    put(b"corrupt-\r\ncrlf.png", rng.bytes(600), "error", "random bytes under a name with CR LF (printed)")
    put(b"corrupt-\xff-latin1.png", rng.bytes(600), "error", "random bytes under a non-UTF-8 name (printed)")

    # Empty and constant images.
    put(b"all-zero.png", png16(np.zeros((HEIGHT, WIDTH))), "empty", "an all-zero PNG: no foreground",
        "foreground")

    # NumPy.
    image = normal_image(rng).astype(np.float32)
    put(b"random-bytes.npy", rng.bytes(1024), "error", "random bytes named .npy")
    put(b"pickled-objects.npy", npy_bytes(np.array([{"a": 1}, None, "x"], dtype=object), allow_pickle=True),
        "error", "a pickled object array (must not be unpickled)")
    full = npy_bytes(image)
    put(b"npy-truncated.npy", full[:len(full) // 2], "error", "a .npy cut in half")
    put(b"four-d.npy", npy_bytes(np.zeros((2, 2, HEIGHT, WIDTH), np.float32)), "error", "a 4-D array")
    rgb = (np.stack([image, image * 0.8, image * 0.6], axis=-1) * 255).astype(np.uint8)
    put(b"rgb.npy", npy_bytes(rgb), "ok", "an H x W x 3 uint8 RGB array: one colour image, not 128 frames")
    put(b"all-nan.npy", npy_bytes(np.full((HEIGHT, WIDTH), np.nan, np.float32)), "error", "an all-NaN float .npy",
        "NaN")
    with_inf = image.copy()
    with_inf[5, 7] = np.inf
    put(b"one-inf.npy", npy_bytes(with_inf), "error", "a float .npy with one inf")
    sparse_npy(folder / "sparse-16000x16000.npy")
    cases.append(Case(b"sparse-16000x16000.npy", "empty",
                      "a 16000 x 16000 uint8 .npy of zeros, sparse on disk: cheap, and empty", "foreground"))

    # TIFF.
    put(b"all-nan.tif", tiff_bytes(np.full((HEIGHT, WIDTH), np.nan, np.float32)), "error", "an all-NaN float32 TIFF",
        "NaN")
    put(b"tiff-truncated.tif", tif[:len(tif) * 2 // 3], "error", "a tiled TIFF cut at two thirds", "truncat")
    put(b"tiff-claims-200000x200000.tif", tiff_claiming(200000, 200000), "error",
        "a tiny TIFF whose tags declare 200000 x 200000 px", "pixel limit")
    put(b"random-bytes.tif", rng.bytes(4096), "error", "random bytes named .tif")

    # DICOM.
    put(b"dicom-1-byte-short.dcm", dicom[:-1], "error", "a DICOM cut 1 byte short", "truncated")
    put(b"dicom-cut-in-header.dcm", dicom[:200], "error", "a DICOM cut inside its header", "truncated")
    put(b"dicom-bad-element-length.dcm", _patch_length(dicom, b"\x08\x00\x60\x00", b"CS", 0xFFF0), "error",
        "a DICOM whose Modality element claims 65520 bytes")
    half_jpeg = dicom_with_fragment("SC_rgb_jpeg_dcmtk.dcm", lambda frame: frame[:len(frame) // 4 * 2])
    if half_jpeg is not None:
        put(b"dicom-jpeg-fragment-cut.dcm", half_jpeg, "error",
            "a valid DICOM whose encapsulated JPEG baseline frame is cut in half")
    garbled = np.random.default_rng(rng_seed + 1)
    bad_j2k = dicom_with_fragment("MR_small_jp2klossless.dcm",
                                  lambda frame: frame[:len(frame) // 2] + garbled.bytes(len(frame) - len(frame) // 2))
    if bad_j2k is not None:
        put(b"dicom-j2k-garbled.dcm", bad_j2k, "error",
            "a valid DICOM whose JPEG 2000 codestream's second half is random bytes")
    volume = np.stack([normal_image(rng), np.zeros((HEIGHT, WIDTH)), normal_image(rng)])
    put(b"volume-zero-frame.dcm", dicom_bytes((volume * 65535).astype(np.uint16), "volume"), "ok",
        "a 3-frame DICOM whose middle frame is all zeros", "foreground", frames=("ok", "empty", "ok"))

    # Non-regular files and links.
    os.mkfifo(os.path.join(base, b"fifo.png"))
    cases.append(Case(b"fifo.png", "error", "a FIFO named .png (opening it would block forever)", "regular file"))
    os.mkdir(os.path.join(base, b"dir-named-x.png"))
    cases.append(Case(b"dir-named-x.png", "error", "a directory named x.png given as a file"))
    os.symlink(b"does-not-exist.png", os.path.join(base, b"dangling-link.png"))
    cases.append(Case(b"dangling-link.png", "error", "a symlink to a missing file"))
    if os.geteuid() != 0:  # root reads anything: no such case there
        put(b"unreadable.png", plain_png, "error", "a valid PNG without read permission", "permission|denied")
        os.chmod(os.path.join(base, b"unreadable.png"), 0)

    # Arguments that match nothing (given relative to `folder`, so the row's path starts as they do).
    for name, why in ((b"=1+1-missing.png", "starting with '='"), (b"@SUM(A1)-missing.png", "starting with '@'"),
                      (b"+cmd-missing.png", "starting with '+'"), (b"-dash-missing.png", "starting with '-'"),
                      (b"\x1b[31mesc-missing.png", "starting with an ESC sequence"),
                      (b"no-match-*.png", "a glob that matches nothing")):
        cases.append(Case(name, "error", f"a command-line argument that matches nothing, {why}", argument=True))
    return cases


if __name__ == "__main__":  # a look at the corpus: python tests/hostile.py FOLDER
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    if target.exists():
        shutil.rmtree(target)
    for case in build_corpus(target):
        print(f"{case.status:5}  {ascii(case.name)[2:-1]:40.40}  {case.why}")
