"""DICOM Parametric Map heatmaps: references, geometry and values, checked against real source files."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

hd = pytest.importorskip("highdicom")

from swssl.errors import ImageReadError  # noqa: E402
from swssl.inference.dicom_out import write_parametric_map  # noqa: E402
from swssl.windows.tiling import ImageScore, WindowGrid  # noqa: E402

PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


def dicom_file(name: str) -> str:
    """A pydicom test file (from the wheel or pydicom-data), never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def window_score(maps: np.ndarray, rows: list[int], cols: list[int], patch: int,
                 to_source: tuple[float, float] = (1.0, 1.0)) -> ImageScore:
    maps = np.asarray(maps, dtype=np.float32)
    return ImageScore(float(np.nanmax(maps)), maps, ~np.isnan(maps),
                      WindowGrid(np.array(rows), np.array(cols), patch, to_source))


def covering_mean(maps: np.ndarray, rows: list[int], cols: list[int], side: int, shape: tuple[int, int]) -> np.ndarray:
    """Each source pixel's mean over the scored windows (source pixels) covering it, the lowest score elsewhere:
    painted window by window, independently of metrics.pixel_map's difference arrays."""
    total, count = np.zeros(shape), np.zeros(shape)
    for r, y in enumerate(rows):
        for c, x in enumerate(cols):
            if not np.isnan(maps[r, c]):
                total[y:y + side, x:x + side] += maps[r, c]
                count[y:y + side, x:x + side] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nanmin(maps))


def write(tmp_path, source, scores, **options):
    path = write_parametric_map(source, scores, tmp_path / "out", "slide-1234", threshold=0.75,
                                threshold_description="95% specificity on val normals", scorer="global", **options)
    return path, pydicom.dcmread(path)


def source_refs(item) -> tuple[str, int | None]:
    ref = item.DerivationImageSequence[0].SourceImageSequence[0]
    return ref.ReferencedSOPInstanceUID, ref.get("ReferencedFrameNumber")


MAPS = np.array([[np.nan, 0.2, 0.4], [0.6, 1.0, 0.1], [0.3, 0.9, 0.5]])


def test_single_frame_ct_references_geometry_and_values(tmp_path):
    source = pydicom.dcmread(dicom_file("CT_small.dcm"))
    rows = cols = [0, 32, 64]
    path, ds = write(tmp_path, dicom_file("CT_small.dcm"), [window_score(MAPS, rows, cols, 64)])

    assert path == tmp_path / "out" / "slide-1234.dcm"
    assert ds.SOPClassUID == PM_SOP_CLASS and ds.NumberOfFrames == 1
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert source_refs(ds.PerFrameFunctionalGroupsSequence[0]) == (source.SOPInstanceUID, None)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, source.PixelSpacing)
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, source.ImageOrientationPatient)
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert np.allclose(position, source.ImagePositionPatient)
    expected = covering_mean(MAPS, rows, cols, 64, (128, 128))
    assert ds.pixel_array.dtype == np.float32
    np.testing.assert_allclose(ds.pixel_array, expected, rtol=0, atol=1e-6)
    # what a viewer reads: the unit, the threshold and the scorer
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeMeaning == "swssl anomaly score"
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped == pytest.approx(0.1)
    assert "threshold 0.75" in ds.ContentDescription and "global" in ds.ContentDescription
    pm = hd.pm.ParametricMap.from_dataset(ds)
    assert pm.SOPInstanceUID == ds.SOPInstanceUID


def test_windows_of_a_resized_image_scale_to_source_pixels(tmp_path):
    # the windows were cut from a 32 x 32 image of the 64 x 64 source: 16 px there, 32 px in the source
    path, ds = write(tmp_path, dicom_file("MR_small.dcm"), [window_score(MAPS, [0, 8, 16], [0, 8, 16], 16, (2.0, 2.0))])
    expected = covering_mean(MAPS, [0, 16, 32], [0, 16, 32], 32, (64, 64))
    np.testing.assert_allclose(ds.pixel_array, expected, rtol=0, atol=1e-6)


def test_multi_frame_source_gives_one_object_with_a_frame_per_source_frame(tmp_path):
    name = dicom_file("eCT_Supplemental.dcm")
    source = pydicom.dcmread(name, stop_before_pixels=True)
    rows = cols = [0, 128, 256]
    maps = [MAPS, MAPS[::-1] * 2]  # frame 1's map differs from frame 0's
    path, ds = write(tmp_path, name, [window_score(m, rows, cols, 256) for m in maps])

    assert ds.NumberOfFrames == source.NumberOfFrames == 2
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    pixels = ds.pixel_array
    seen = set()
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, number = source_refs(item)
        assert uid == source.SOPInstanceUID
        seen.add(number)
        source_item = source.PerFrameFunctionalGroupsSequence[number - 1]
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                           source_item.PlanePositionSequence[0].ImagePositionPatient)
        expected = covering_mean(maps[number - 1], rows, cols, 256, (512, 512))
        np.testing.assert_allclose(pixels[index], expected, rtol=0, atol=1e-6)
    assert seen == {1, 2}
    assert hd.pm.ParametricMap.from_dataset(ds).NumberOfFrames == 2


def test_a_large_frame_is_downsampled_with_consistent_geometry(tmp_path):
    name = dicom_file("eCT_Supplemental.dcm")
    source = pydicom.dcmread(name, stop_before_pixels=True)
    rows = cols = [0, 128, 256]
    maps = [MAPS, MAPS * 3]
    path, ds = write(tmp_path, name, [window_score(m, rows, cols, 256) for m in maps], max_pixels=128 * 128)

    k = 4  # the smallest factor bringing 512 x 512 to 128 x 128
    assert (ds.Rows, ds.Columns) == (512 // k, 512 // k)
    shared_source = source.SharedFunctionalGroupsSequence[0]
    spacing = np.array(shared_source.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    cosines = np.array(shared_source.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    assert np.allclose(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, spacing * k)
    pixels = ds.pixel_array
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        _, number = source_refs(item)
        corner = np.array(source.PerFrameFunctionalGroupsSequence[number - 1]
                          .PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        # the first output pixel's centre is the centre of source pixels 0..3: 1.5 pixels along each axis
        centre = corner + 1.5 * (cosines[:3] * spacing[1] + cosines[3:] * spacing[0])
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, centre, atol=1e-4)
        full = covering_mean(maps[number - 1], rows, cols, 256, (512, 512))
        np.testing.assert_allclose(pixels[index], full[k // 2::k, k // 2::k], rtol=0, atol=1e-6)


def test_projection_image_without_position_is_written_at_full_size(tmp_path):
    # a CR without frame of reference or ImagePositionPatient, like many MG/DX: pixel-aligned, never downsampled
    name = dicom_file("RG1_UNCI.dcm")
    source = pydicom.dcmread(name, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in source and "ImagePositionPatient" not in source
    rows, cols = [0, 600, 1200], [0, 500, 1000]
    path, ds = write(tmp_path, name, [window_score(MAPS, rows, cols, 700)], max_pixels=1000)

    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert "FrameOfReferenceUID" not in ds
    item = ds.PerFrameFunctionalGroupsSequence[0]
    assert source_refs(item) == (source.SOPInstanceUID, None)
    assert "PlanePositionSequence" not in item
    expected = covering_mean(MAPS, rows, cols, 700, (source.Rows, source.Columns))
    np.testing.assert_allclose(ds.pixel_array, expected, rtol=0, atol=1e-6)
    assert hd.pm.ParametricMap.from_dataset(ds).NumberOfFrames == 1


def test_multi_frame_source_without_positions_is_refused(tmp_path):
    name = dicom_file("OBXXXX1A_2frame.dcm")
    score = window_score(MAPS, [0, 100, 200], [0, 100, 200], 300)
    with pytest.raises(ImageReadError, match="OBXXXX1A_2frame.dcm: no DICOM heatmap: 2 frames without patient"):
        write(tmp_path, name, [score, score])
    assert not (tmp_path / "out" / "slide-1234.dcm").exists()


def test_non_dicom_source_is_refused(tmp_path):
    source = tmp_path / "slide.png"
    source.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ImageReadError) as caught:
        write(tmp_path, source, [window_score(MAPS, [0, 1, 2], [0, 1, 2], 2)])
    message = str(caught.value)
    assert message.startswith(str(source)) and "not a DICOM file" in message and "\n" not in message


def test_one_score_per_source_frame_is_required(tmp_path):
    with pytest.raises(ValueError, match="1 score map"):
        write(tmp_path, dicom_file("eCT_Supplemental.dcm"), [window_score(MAPS, [0, 128, 256], [0, 128, 256], 256)])


def ct_series(tmp_path, count: int) -> list:
    """`count` single-frame copies of CT_small, one series: new SOP Instance UIDs, 5 mm apart."""
    paths = []
    for index in range(count):
        ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [5.0 * index]
        ds.InstanceNumber = index + 1
        paths.append(tmp_path / f"ct{index}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_series_of_single_frame_files_gives_one_object(tmp_path):
    paths = ct_series(tmp_path, 3)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    rows = cols = [0, 32, 64]
    maps = [MAPS * (i + 1) for i in range(3)]
    path, ds = write(tmp_path, paths, [window_score(m, rows, cols, 64) for m in maps])

    assert ds.NumberOfFrames == 3
    by_uid = {s.SOPInstanceUID: i for i, s in enumerate(sources)}
    pixels = ds.pixel_array
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, _ = source_refs(item)
        i = by_uid[uid]
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, sources[i].ImagePositionPatient)
        np.testing.assert_allclose(pixels[index], covering_mean(maps[i], rows, cols, 64, (128, 128)), atol=1e-6)
    assert sorted(by_uid[source_refs(item)[0]] for item in ds.PerFrameFunctionalGroupsSequence) == [0, 1, 2]


def test_source_without_patient_and_study_details_still_gets_a_map(tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        delattr(ds, keyword)
    ds.save_as(tmp_path / "anonymous.dcm")
    path, out = write(tmp_path, tmp_path / "anonymous.dcm", [window_score(MAPS, [0, 32, 64], [0, 32, 64], 64)])
    assert out.StudyInstanceUID == ds.StudyInstanceUID and out.PatientID == ""
