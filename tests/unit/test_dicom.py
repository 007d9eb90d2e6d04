"""DICOM by the standard (data/dicom.py) on the real files pydicom and pydicom-data ship: a
windowed grey image equals the standard's linear VOI formula (PS3.3 C.11.2.1.2) applied to the
modality-LUT values (rescale slope/intercept computed here), mapped to 0-255, pixel for pixel
within rounding; MONOCHROME1 inverted; a VOI LUT Sequence as its table says; a window given by
the caller or a preset replaces the file's; percentiles only without a window, and said;
colour (RGB, YBR, 16-bit, palette) as pydicom decodes it; multi-frame middle / all / N; bad
flags named."""

import warnings

import numpy as np
import pytest

from medmoe_mcore.data import dicom

pydicom = pytest.importorskip("pydicom")


def _file(name):
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return path


def _standard(values, center, width):
    """PS3.3 C.11.2.1.2.1, LINEAR, onto 0..255."""
    y = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(values <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(values > center - 0.5 + (width - 1) / 2, 255, y)
    return y


def _first(value):
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _grey(image):
    a = np.asarray(image)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    return a[..., 0].astype(np.float64)


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCI.dcm", "MR2_UNCI.dcm",
                                  "693_UNCI.dcm", "MR_small.dcm", "693_J2KI.dcm",
                                  "MR-SIEMENS-DICOM-WithOverlays.dcm"])
def test_the_files_window_as_the_standard_says(name):
    ds = pydicom.dcmread(_file(name))
    (frame,) = dicom.decode(_file(name))
    assert frame.how == "file_window"
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0))  # the modality LUT: CT in Hounsfield units
    expected = _standard(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 255 - expected
    ours = _grey(frame.image)
    assert np.abs(ours - expected).max() <= 1.0  # rounding only
    assert np.mean(ours == np.round(expected)) > 0.99


def test_a_given_window_or_preset_replaces_the_files():
    ds = pydicom.dcmread(_file("693_UNCI.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for given, (center, width) in (("ct-lung", (-600, 1500)), ("300,1200", (300, 1200))):
        (frame,) = dicom.decode(_file("693_UNCI.dcm"), dicom.DicomOptions.parse(given))
        assert frame.how == "override"
        assert np.abs(_grey(frame.image) - _standard(hu, center, width)).max() <= 1.0
    (file_window,) = dicom.decode(_file("693_UNCI.dcm"))
    assert not np.array_equal(np.asarray(file_window.image), np.asarray(frame.image))


def test_a_voi_lut_sequence_is_applied_as_its_table_says():
    ds = pydicom.dcmread(_file("vlut_04.dcm"))
    lut = ds.VOILUTSequence[0]
    entries, first, bits = (int(x) for x in lut.LUTDescriptor)
    table = np.asarray(lut.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = table[index] / (2 ** bits - 1) * 255
    (frame,) = dicom.decode(_file("vlut_04.dcm"))
    assert frame.how == "voi_lut"
    assert np.abs(_grey(frame.image) - expected).max() <= 1.0


@pytest.mark.parametrize("name", ["CT_small.dcm", "mlut_18.dcm"])
def test_without_a_window_percentiles_and_it_is_said(name):
    ds = pydicom.dcmread(_file(name))
    (frame,) = dicom.decode(_file(name))
    assert frame.how == "percentile"
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    low, high = np.percentile(values, 0.5), np.percentile(values, 99.5)
    expected = np.clip((values - low) / (high - low), 0, 1) * 255
    assert np.abs(_grey(frame.image) - expected).max() <= 1.0


def test_colour_as_pydicom_decodes_it():
    for name, scale in (("US1_UNCI.dcm", 1), ("SC_rgb_rle_16bit.dcm", 255 / 65535)):
        ds = pydicom.dcmread(_file(name))
        (frame,) = dicom.decode(_file(name))
        assert frame.how == "colour"
        diff = np.asarray(frame.image).astype(np.float64) - ds.pixel_array * scale
        assert np.abs(diff).max() <= 0.5
    ds = pydicom.dcmread(_file("examples_ybr_color.dcm"))  # YBR_FULL_422, 30 frames
    (frame,) = dicom.decode(_file("examples_ybr_color.dcm"))
    assert frame.index == 15 and np.array_equal(np.asarray(frame.image), ds.pixel_array[15])
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(_file("examples_palette.dcm"))
    (frame,) = dicom.decode(_file("examples_palette.dcm"))
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    assert frame.how == "palette"
    assert np.abs(np.asarray(frame.image) - rgb / (65535 if rgb.max() > 255 else 255) * 255
                  ).max() <= 0.5


def test_frames_middle_all_or_one_and_bad_flags():
    path = _file("emri_small.dcm")  # 10 frames
    assert [f.index for f in dicom.decode(path)] == [5]
    assert [f.index for f in dicom.decode(path, dicom.DicomOptions.parse(frames="all"))] == \
        list(range(10))
    assert [f.index for f in dicom.decode(path, dicom.DicomOptions.parse(frames="3"))] == [3]
    with pytest.raises(ValueError, match="--dicom-frames 10, but the file has 10 frame"):
        dicom.decode(path, dicom.DicomOptions.parse(frames="10"), label=path)
    for window, frames, flag in (("lung", "middle", "--dicom-window lung"),
                                 ("40,0", "middle", "--dicom-window 40,0"),
                                 (None, "-1", "--dicom-frames -1"),
                                 (None, "last", "--dicom-frames last")):
        with pytest.raises(ValueError, match=flag):
            dicom.DicomOptions.parse(window, frames)


def test_prepare_stores_each_frame_windowed_and_counts_how(tmp_path):
    """tools/prepare_data.py's path: DICOM records become PNG frames windowed by data/dicom.py,
    the report counts them by how (percentile said), all frames make one record each, a
    missing frame is a counted skip."""
    import io
    import json
    import shutil

    from PIL import Image

    from medmoe_mcore.data.records import read_shards, write_shards

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("RG1_UNCI.dcm", "CT_small.dcm", "emri_small.dcm"):
        shutil.copy(_file(name), folder / name)

    def record(i, image):
        return {"id": f"q{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "an image"}]}

    from medmoe_mcore.data.records import folder_reader

    records = [record(0, "RG1_UNCI.dcm"), record(1, "CT_small.dcm"),
               record(2, "emri_small.dcm")]
    report = write_shards(records, folder_reader(folder), tmp_path / "a", show_progress=False)
    assert report.written == 3 and dict(report.dicom) == {"file_window": 1, "percentile": 2}
    assert json.loads((tmp_path / "a" / "report.json").read_text())[
        "dicom_frames_by_windowing"] == {"file_window": 1, "percentile": 2}
    stored = {r["id"]: (r, data) for r, data in read_shards(sorted((tmp_path / "a").glob(
        "*.tar")))}
    rg1, png = stored["q0"]
    assert rg1["image"] == "RG1_UNCI.dcm.frame0.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
                          np.asarray(dicom.decode(_file("RG1_UNCI.dcm"))[0].image))
    options = dicom.DicomOptions.parse(frames="all")
    report = write_shards(records[2:], folder_reader(folder), tmp_path / "b",
                          show_progress=False, dicom_options=options)
    assert report.written == 10 and report.dicom["percentile"] == 10
    ids = [r["id"] for r, _ in read_shards(sorted((tmp_path / "b").glob("*.tar")))]
    assert ids == [f"q2#frame{i}" for i in range(10)]
    report = write_shards(records, folder_reader(folder), tmp_path / "c", show_progress=False,
                          dicom_options=dicom.DicomOptions.parse(frames="4"))
    assert report.written == 1 and report.skipped == {"dicom_frame_missing": 2}


def test_generation_and_evaluation_read_dicom_through_the_same_function():
    from medmoe_mcore.inference.questions import Question

    path = _file("693_UNCI.dcm")
    options = dicom.DicomOptions.parse("ct-bone")
    asked = Question(0, 0, "q", path, dicom=options).load_image()
    assert np.array_equal(np.asarray(asked), np.asarray(dicom.decode(path, options)[0].image))
    default = Question(0, 0, "q", path).load_image()
    assert np.array_equal(np.asarray(default), np.asarray(dicom.decode(path)[0].image))
