"""DICOM heatmaps for radiology viewers: a slide's window-score map as a Parametric Map over its source.

`write_parametric_map` writes one DICOM Parametric Map (`highdicom.pm.ParametricMap`, float32
pixels) per source file, or per series of single-frame files: one frame per source frame, with the
source's patient, study and frame of reference, new series / instance UIDs, and per-frame
references (Derivation Image / Source Image sequences) to the source SOP Instance UID and frame
number, so a viewer lays it over the slice it came from.

Why a Parametric Map and not a Segmentation: the score is continuous and the decision threshold
is one operating point among many (calibrations change it, a reader may want another). A
Parametric Map keeps the scores: OHIF (v3.9+, its cornerstone-dicom-pmap extension) shows it as a
colour-mapped fusion overlay with a colour bar over the referenced series, and 3D Slicer
(QuantitativeReporting / dcmqi) loads it as a scalar volume aligned with the source, to window or
threshold interactively. A binary Segmentation of the windows above the threshold would show a
yes/no region at one fixed threshold and lose the ranking of the regions. The threshold and its
description travel in ContentDescription (and a Real World Value Mapping names the unit: the
swssl anomaly score of the run's scorer), so a viewer's user can set the same cut.

Pixels: each pixel holds the mean score of the scored windows covering its centre
(`metrics.pixel_map`, computed in the image the windows were cut from, where they are square,
then sampled at each output pixel's centre); pixels no scored window covers hold the smallest
scored score (0 for a frame without foreground), so they never look anomalous. The map is at the
source frame's size, unless a frame has more than `max_pixels` pixels and the source has patient
positions: then it is downsampled by the smallest integer k that fits, with the pixel spacing
times k and each frame's position moved to the centre of its first k x k block. A 2-D projection
image without positions (MG/DX/CR often lack ImagePositionPatient or a frame of reference) is
written at full size: highdicom requires such a map to be pixel-aligned with its single source
frame. A multi-frame source without positions cannot be placed frame by frame and is refused.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code

from swssl import __version__
from swssl.errors import ImageReadError
from swssl.files import atomic_write
from swssl.names import one_line
from swssl.scoring.metrics import pixel_map
from swssl.windows.tiling import ImageScore

MAX_PIXELS = 1 << 20  # per frame of the map when the source has positions (4 MB of float32)
LUT_LABEL = "SWSSL_SCORE"
CONTENT_LABEL = "SWSSL_HEATMAP"
SERIES_NUMBER = 9001  # after the scanner's own series in a viewer's list
# Type 2 patient/study attributes highdicom copies from the source; anonymised files often drop them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")


def write_parametric_map(sources: str | Path | Sequence[str | Path], scores: Sequence[ImageScore],
                         out_dir: str | Path, name: str, *, threshold: float | None, threshold_description: str,
                         scorer: str, max_pixels: int = MAX_PIXELS) -> Path:
    """Write `out_dir/<name>.dcm`, the Parametric Map of `scores`, and return its path.

    `sources` is one DICOM file (then `scores[i]` is frame i's) or a series of single-frame files
    (then `scores[i]` is file i's); every frame needs its score. ImageReadError names a source that
    is not DICOM or whose geometry a map cannot reference; OutputError a file that cannot be written.
    """
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(p) for p in sources]
    headers = [_read_header(path) for path in paths]
    shape = (int(headers[0].Rows), int(headers[0].Columns))
    frames = sum(int(h.get("NumberOfFrames") or 1) for h in headers)
    if len(scores) != frames:
        raise ValueError(f"{paths[0]}: {len(scores)} score map(s) for {frames} source frame(s)")
    positioned = _positioned(headers[0])
    if frames > 1 and not positioned:
        raise ImageReadError(paths[0], f"no DICOM heatmap: {frames} frames without patient positions (a frame of "
                                       "reference and ImagePositionPatient) cannot be referenced frame by frame")
    k = _downsample_factor(shape, max_pixels) if positioned else 1
    maps = np.stack([_source_map(score, shape, k) for score in scores])
    try:
        with warnings.catch_warnings():  # highdicom's remarks on the source's metadata (person name format, ...)
            warnings.simplefilter("ignore", UserWarning)
            pm = _parametric_map(headers, maps, k, threshold, threshold_description, scorer)
    except (ValueError, AttributeError) as exc:  # highdicom's word on a source it cannot reference
        raise ImageReadError(paths[0], f"no DICOM heatmap: {one_line(exc)}") from None
    out = Path(out_dir) / f"{name}.dcm"
    atomic_write(out, pm.save_as)
    return out


def _downsample_factor(shape: tuple[int, int], max_pixels: int) -> int:
    """The smallest integer k with ceil(H/k) x ceil(W/k) <= max_pixels."""
    height, width = shape
    k = max(1, math.isqrt(max(0, height * width // max(1, max_pixels))))
    while math.ceil(height / k) * math.ceil(width / k) > max_pixels:
        k += 1
    return k


def _source_map(score: ImageScore, shape: tuple[int, int], k: int = 1) -> np.ndarray:
    """A frame's per-pixel score (ceil(H/k) x ceil(W/k) float32) at the centres of the source's k x k blocks."""
    if score.window_scores is None or score.windows is None:
        raise ValueError("a DICOM heatmap needs the window-score map and its window grid")
    grid, (sy, sx) = score.windows, score.windows.to_source
    # The image the windows were cut from, where they are square and start on whole pixels.
    cut = (math.ceil(round(shape[0] / sy, 6)), math.ceil(round(shape[1] / sx, 6)))
    heat = pixel_map(score.window_scores, grid.rows, grid.cols, grid.patch, cut)
    rows = _centres(math.ceil(shape[0] / k), k, sy, cut[0])
    cols = _centres(math.ceil(shape[1] / k), k, sx, cut[1])
    return heat[np.ix_(rows, cols)]


def _centres(count: int, k: int, factor: float, limit: int) -> np.ndarray:
    """Indices, in the cut image, of the pixels under the centres of `count` blocks of k source pixels."""
    return np.minimum(np.floor((np.arange(count) + 0.5) * k / factor).astype(int), limit - 1)


def _read_header(path: Path) -> pydicom.Dataset:
    """The source's header (no pixels), with empty type 2 patient/study attributes where it has none."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise ImageReadError(path, "not a DICOM file: a DICOM heatmap needs a DICOM source") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read ({one_line(exc)})") from None
    missing = [kw for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
               if kw not in header]
    if missing:
        raise ImageReadError(path, f"no DICOM heatmap: the header has no {', '.join(missing)}")
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _positioned(header: pydicom.Dataset) -> bool:
    """Whether the source places its frames in patient space (then the map may be downsampled)."""
    return hd.spatial.get_image_coordinate_system(header) == hd.CoordinateSystemNames.PATIENT


def _parametric_map(headers: list[pydicom.Dataset], maps: np.ndarray, k: int, threshold: float | None, description: str,
                    scorer: str) -> hd.pm.ParametricMap:
    lo, hi = float(maps.min()), float(maps.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL, lut_explanation=f"swssl anomaly score ({scorer} scorer)"[:64],
        unit=Code("{score}", "UCUM", "swssl anomaly score"), value_range=(lo, hi), slope=1.0, intercept=0.0)
    decision = "no threshold" if threshold is None else f"threshold {threshold:.6g}: {description}"
    text = one_line(f"swssl {scorer} score; {decision}")
    measures, positions = _downsampled_geometry(headers, k) if k > 1 else (None, None)
    return _ParametricMap(
        source_images=headers, pixel_array=maps, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="swssl", manufacturer_model_name="swssl-infer",
        software_versions=__version__, device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], content_label=CONTENT_LABEL, content_description=text[:64],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2,
                                                         window_width=max(hi - lo, 1e-6))],
        pixel_measures=measures, plane_positions=positions)


class _ParametricMap(hd.pm.ParametricMap):
    """highdicom 0.28's ParametricMap, mended for a source without patient positions: its Dimension Index
    Sequence then indexes the frames by Frame Label, but highdicom leaves each frame's label and index
    values empty and refuses its own object; here the frame gets label "Frame" and index 1 first."""

    def _build_luts(self) -> None:
        for item in self.get("PerFrameFunctionalGroupsSequence", []):
            content = item.FrameContentSequence[0]
            if self._coordinate_system is None and not content.get("DimensionIndexValues"):
                content.FrameLabel, content.DimensionIndexValues = "Frame", [1]
        super()._build_luts()


def _downsampled_geometry(headers: list[pydicom.Dataset], k: int
                          ) -> tuple[hd.PixelMeasuresSequence, list[hd.PlanePositionSequence]]:
    """Pixel measures (spacing times k) and per-frame positions (moved to the first k x k block's centre)."""
    first = headers[0]
    shared = first.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in first else first
    measures = shared.PixelMeasuresSequence[0] if "PixelMeasuresSequence" in shared else first
    orientation = (shared.PlaneOrientationSequence[0] if "PlaneOrientationSequence" in shared else first)
    spacing = np.array(measures.PixelSpacing, dtype=float)  # between rows, between columns
    cosines = np.array(orientation.ImageOrientationPatient, dtype=float)  # along a row, along a column
    shift = (k - 1) / 2 * (cosines[:3] * spacing[1] + cosines[3:] * spacing[0])
    pixel_measures = hd.PixelMeasuresSequence(pixel_spacing=[float(s) for s in spacing * k],
                                              slice_thickness=measures.get("SliceThickness"),
                                              spacing_between_slices=measures.get("SpacingBetweenSlices"))
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in np.add(p, shift)])
                 for p in _positions(headers)]
    return pixel_measures, positions


def _positions(headers: list[pydicom.Dataset]) -> list:
    """Each source frame's ImagePositionPatient, in frame order (multi-frame) or file order (series)."""
    if "PerFrameFunctionalGroupsSequence" in headers[0]:
        return [item.PlanePositionSequence[0].ImagePositionPatient
                for item in headers[0].PerFrameFunctionalGroupsSequence]
    return [header.ImagePositionPatient for header in headers]
