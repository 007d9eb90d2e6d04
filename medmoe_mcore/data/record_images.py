"""A record's images as a shard stores them: a DICOM image as the PNG of each frame asked for
(data/dicom.py; several frames: one record each), a record of several images (`images`) as
one record whose images keep the order of its <image> tokens."""

from __future__ import annotations

import io
from pathlib import Path

from medmoe_mcore.data.images import ImageTooLargeError, is_dicom
from medmoe_mcore.data.skips import SkipRecord


def extension(name) -> str:
    return Path(str(name or "x.png")).suffix.lstrip(".").lower() or "png"


def several_images(record: dict, names: list, image_reader, options, max_pixels) -> tuple:
    """(record, [bytes], [how]) of a record of several images: each read as its own `image`,
    a DICOM one as the PNG of its one frame (--dicom-frames all cannot apply: the record
    keeps one image per <image>)."""
    blobs, hows, stored = [], [], []
    for name in names:
        data = image_reader(dict(record, image=name))
        how = None
        if data is not None and is_dicom(data):
            if options is not None and options.frames == "all":
                raise SkipRecord("too_many_images", f"{name}: --dicom-frames all on a record "
                                                    "of several images (use middle or N)")
            ((_, data, how),) = dicom_records(dict(record, image=name), data, options,
                                               max_pixels)
            name = f"{name}.png"
        blobs.append(data)
        hows.append(how)
        stored.append(name)
    return dict(record, images=stored), blobs, hows


def dicom_records(record: dict, image: bytes, options, max_pixels) -> list:
    """[(record, PNG bytes, how)] of a DICOM record: one per frame asked for."""
    from medmoe_mcore.data import dicom

    label = str(record.get("image"))
    try:
        frames = dicom.decode(io.BytesIO(image), options or dicom.DicomOptions(), max_pixels,
                              label)
    except ImageTooLargeError as e:
        raise SkipRecord("image_too_large", str(e)) from None
    except ValueError as e:
        if "--dicom-frames" in str(e):
            raise SkipRecord("dicom_frame_missing", str(e)) from None
        raise SkipRecord("corrupt_image", f"{label}: cannot decode DICOM ({e})") from None
    except Exception as e:  # pydicom raises many kinds for a broken file
        raise SkipRecord("corrupt_image", f"{label}: cannot decode DICOM ({e})") from None
    out = []
    for frame in frames:
        buf = io.BytesIO()
        frame.image.save(buf, format="PNG")
        one = dict(record, image=f"{label}.frame{frame.index}.png")
        if len(frames) > 1:
            one["id"] = f"{record.get('id')}#frame{frame.index}"
        out.append((one, buf.getvalue(), frame.how))
    return out
