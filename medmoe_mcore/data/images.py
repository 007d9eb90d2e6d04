"""Image loading and CLIP preprocessing with PIL and NumPy only (no torchvision on CPU boxes).

Training pads to a square with the processor's mean colour before resizing (the authors'
`expand2square`); evaluation uses the CLIP processor as is (shortest edge resized, centre
crop). Both then rescale to [0, 1] and normalise with CLIP's mean/std. Matches
`transformers.CLIPImageProcessor` (its PIL path) to float precision.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medmoe_mcore.config.model import VisionConfig

from medmoe_mcore.data.image_limits import (DEFAULT_MAX_PIXELS, ImageDecodeError,  # noqa: F401
                                            ImageTooLargeError, check_size)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10: a 128-byte preamble, then "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def dicom_to_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS, label: str = "DICOM",
                 options=None) -> Image.Image:
    """A DICOM file (path or file-like) as 8-bit RGB, by the standard (data/dicom.py): the
    file's modality LUT and window (percentiles only without one), its middle frame unless
    `options` (a dicom.DicomOptions) says otherwise."""
    from medmoe_mcore.data import dicom

    return dicom.decode(source, options or dicom.DicomOptions(), max_pixels, label)[0].image


def load_image(source: bytes | str | Path, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, dicom=None) -> Image.Image:
    """Decode PNG/JPEG/... or DICOM (by data/dicom.py, with `dicom` options) to RGB; raises
    ImageDecodeError naming `name` (or the path), ImageTooLargeError before decoding an image
    of more than `max_pixels`."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{label}: cannot read ({e})") from None
    if is_dicom(data):
        try:
            return dicom_to_rgb(io.BytesIO(data), max_pixels, label, dicom)
        except ImageTooLargeError:
            raise
        except Exception as e:  # pydicom raises many kinds for a broken file
            raise ImageDecodeError(f"{label}: cannot decode DICOM ({e})") from None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        check_size(label, *image.size, max_pixels)
        image.load()
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{label}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageDecodeError(f"{label}: cannot decode image ({e})") from None
    return image.convert("RGB")


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


def _resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, vision: VisionConfig, train: bool) -> torch.Tensor:
    """RGB PIL image -> float32 [3, image_size, image_size], normalised."""
    if train:
        image = expand2square(image, tuple(int(x * 255) for x in vision.image_mean))
    image = _center_crop(_resize_shortest_edge(image, vision.image_size), vision.image_size)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    mean = np.asarray(vision.image_mean, dtype=np.float32)
    std = np.asarray(vision.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())
