"""DICOM pixels to 8-bit images by the standard, through pydicom's own LUT functions.

Grey images: the modality LUT first (Rescale Slope/Intercept or a Modality LUT Sequence: CT in
Hounsfield units), then the VOI stage: a window given by the caller (`--dicom-window C,W` or a
preset name) or else the file's own (its VOI LUT Sequence, or its first Window Center/Width,
as `pydicom.pixels.apply_voi_lut` prefers); only a file with neither is windowed to the 0.5-99.5
percentiles of its values, and that is said (`percentile` in the counts a caller reports). The
VOI output range maps linearly to 0-255; MONOCHROME1 is inverted after windowing (white = air
stays white). Colour: pydicom's decoding converts YBR to RGB; deeper than 8 bits scales to 8;
PALETTE COLOR goes through `apply_color_lut`. Multi-frame files: the middle frame, every frame,
or frame N (from 0), as asked.

Per-frame functional groups of enhanced multi-frame files are not read (their top-level
attributes are, as pydicom's functions do)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from medmoe_mcore.data.image_limits import DEFAULT_MAX_PIXELS, check_size

# (center, width) of common CT windows, in Hounsfield units.
WINDOW_PRESETS = {"ct-lung": (-600.0, 1500.0), "ct-mediastinum": (50.0, 350.0),
                  "ct-abdomen": (40.0, 400.0), "ct-bone": (400.0, 1800.0),
                  "ct-brain": (40.0, 80.0)}
# how a frame became 8 bits (the prepare report counts them)
HOW = ("file_window", "voi_lut", "override", "percentile", "colour", "palette")


@dataclass(frozen=True)
class DicomOptions:
    window: Optional[tuple] = None  # (center, width) overriding the file's VOI
    frames: Union[str, int] = "middle"  # "middle", "all" or a frame index

    @classmethod
    def parse(cls, window: Optional[str] = None, frames: str = "middle") -> "DicomOptions":
        """From the flags' text; a bad value raises ValueError naming the flag."""
        chosen = None
        if window:
            if window in WINDOW_PRESETS:
                chosen = WINDOW_PRESETS[window]
            else:
                try:
                    center, width = (float(x) for x in window.split(","))
                except ValueError:
                    raise ValueError(f"--dicom-window {window}: give CENTER,WIDTH or one of "
                                     f"{', '.join(WINDOW_PRESETS)}") from None
                if not width >= 1:
                    raise ValueError(f"--dicom-window {window}: the width must be 1 or more")
                chosen = (center, width)
        if frames not in ("middle", "all"):
            try:
                frames = int(frames)
            except ValueError:
                raise ValueError(f"--dicom-frames {frames}: middle, all or a frame number "
                                 "(from 0)") from None
            if frames < 0:
                raise ValueError(f"--dicom-frames {frames}: a frame number counts from 0")
        return cls(chosen, frames)


def add_arguments(parser, one_frame: bool = False) -> None:
    """--dicom-window and --dicom-frames on a tool's parser (`one_frame`: a question carries
    one image, so `all` is not offered)."""
    presets = ", ".join(WINDOW_PRESETS)
    parser.add_argument("--dicom-window",
                        help="DICOM: CENTER,WIDTH (in the modality LUT's units: Hounsfield for "
                             f"CT) or a preset ({presets}) instead of the file's own window "
                             "(default: the file's VOI LUT or first window; percentiles only "
                             "when it has none)")
    parser.add_argument("--dicom-frames", default="middle",
                        help="DICOM multi-frame files: middle (default)"
                             + (" or a frame number from 0" if one_frame else
                                ", all (one record per frame, ids <id>#frame<N>) or a frame "
                                "number from 0"))


def options_of(args, one_frame: bool = False) -> "DicomOptions":
    """The DicomOptions of a tool's parsed flags; ValueError naming a bad one."""
    if one_frame and args.dicom_frames == "all":
        raise ValueError("--dicom-frames all: a question carries one image; choose middle or "
                         "a frame number")
    return DicomOptions.parse(args.dicom_window, args.dicom_frames)


@dataclass
class DicomFrame:
    image: Image.Image  # RGB
    how: str  # one of HOW
    index: int  # the frame's number in the file


def _frames(pixels: np.ndarray, count: int, colour: bool, frames, label: str):
    """[(index, array)] of the frames asked for."""
    if count == 1:
        stack = pixels[None]
    else:
        stack = pixels
    if frames == "middle":
        chosen = [count // 2]
    elif frames == "all":
        chosen = list(range(count))
    else:
        if frames >= count:
            raise ValueError(f"{label}: --dicom-frames {frames}, but the file has {count} "
                             "frame(s)")
        chosen = [frames]
    return [(i, stack[i]) for i in chosen]


def _to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _grey(frame: np.ndarray, ds, options: DicomOptions) -> tuple[np.ndarray, str]:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(frame, ds)
    voi = ds
    if options.window is not None:
        voi = copy.copy(ds)  # the caller's window replaces the file's VOI
        for keyword in ("VOILUTSequence", "VOILUTFunction"):
            if keyword in voi:
                delattr(voi, keyword)
        voi.WindowCenter, voi.WindowWidth = options.window
        how = "override"
    elif "VOILUTSequence" in ds:
        how = "voi_lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        how = "file_window"
    else:
        low, high = np.percentile(values, 0.5), np.percentile(values, 99.5)
        return _to_8bit(np.clip(values, low, high), low, high), "percentile"
    out = apply_voi_lut(values, voi, index=0)
    if how == "voi_lut":  # the LUT's output range: its descriptor's bit depth
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return _to_8bit(out, 0, 2 ** bits - 1), how
    # a window maps onto [y_min, y_max]: where inputs far below and above it land
    ends = apply_voi_lut(np.array([values.min() - 1e9, values.max() + 1e9]), voi, index=0)
    return _to_8bit(out, float(ends.min()), float(ends.max())), how


def decode(source, options: DicomOptions = DicomOptions(), max_pixels: Optional[int] = None,
           label: str = "DICOM") -> list[DicomFrame]:
    """The frames of a DICOM file (path or file-like) that `options` asks for, as 8-bit RGB.
    The pixel count is checked from the header before any pixel is decoded."""
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(source)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    check_size(label, int(ds.Columns), int(ds.Rows) * count, max_pixels or DEFAULT_MAX_PIXELS)
    photometric = str(ds.PhotometricInterpretation)
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    out = []
    for index, frame in _frames(ds.pixel_array, count, colour, options.frames, label):
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)
            depth = 65535 if rgb.dtype.itemsize > 1 else 255
            pixels, how = _to_8bit(rgb, 0, depth), "palette"
        elif colour:  # pydicom has converted YBR to RGB
            depth = 2 ** int(ds.BitsStored) - 1
            pixels, how = _to_8bit(frame, 0, depth), "colour"
        else:
            pixels, how = _grey(frame, ds, options)
            if photometric == "MONOCHROME1":
                pixels = 255 - pixels
        out.append(DicomFrame(Image.fromarray(pixels).convert("RGB"), how, index))
    return out
