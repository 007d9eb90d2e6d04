"""Real medical images that pip packages ship (pydicom-data, pydicom, scikit-image), with the
facts known about each one. No download: everything is read from installed packages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from PIL import Image


@dataclass(frozen=True)
class MedicalImage:
    name: str
    modality: str          # the router's modality label: X-Ray, CT, MRI, Ultrasound, Pathology...
    organ: str
    plane: Optional[str]   # axial / coronal / sagittal / None
    colour: str            # grayscale / colour
    load: Callable[[], Image.Image]
    description: str


def dicom_image(file_name: str) -> Image.Image:
    """A DICOM test file of pydicom / pydicom-data as 8-bit RGB."""
    from pydicom.data import get_testdata_file

    from medmoe_mcore.data.images import dicom_to_rgb

    path = get_testdata_file(file_name)
    if path is None:
        raise FileNotFoundError(f"{file_name}: not in pydicom / pydicom-data")
    return dicom_to_rgb(path)


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load():
        from skimage import data

        return Image.fromarray(getattr(data, name)()).convert("RGB")

    return load


def _dicom(file_name: str) -> Callable[[], Image.Image]:
    return lambda: dicom_image(file_name)


CATALOGUE: tuple[MedicalImage, ...] = (
    MedicalImage("RG1_UNCI", "X-Ray", "chest", "coronal", "grayscale", _dicom("RG1_UNCI.dcm"),
                 "a frontal chest radiograph"),
    MedicalImage("RG3_UNCI", "X-Ray", "leg", None, "grayscale", _dicom("RG3_UNCI.dcm"),
                 "a radiograph of the distal tibia"),
    MedicalImage("MR2_UNCI", "MRI", "shoulder", None, "grayscale", _dicom("MR2_UNCI.dcm"),
                 "a magnetic resonance image of the shoulder"),
    # Anatomy below is only what the files' metadata (orientation, descriptions) supports.
    MedicalImage("MR_small", "MRI", "body", "axial", "grayscale", _dicom("MR_small.dcm"),
                 "an axial magnetic resonance image"),
    MedicalImage("693_UNCI", "CT", "body", "axial", "grayscale", _dicom("693_UNCI.dcm"),
                 "an axial computed tomography slice (5 mm, plain)"),
    MedicalImage("CT_small", "CT", "body", "axial", "grayscale", _dicom("CT_small.dcm"),
                 "an axial computed tomography slice"),
    MedicalImage("US1_UNCI", "Ultrasound", "body", None, "colour", _dicom("US1_UNCI.dcm"),
                 "an ultrasound image"),
    MedicalImage("immunohistochemistry", "Pathology", "colon", None, "colour",
                 _skimage("immunohistochemistry"),
                 "an immunohistochemistry-stained tissue section"),
    MedicalImage("retina", "Fundus", "eye", None, "colour", _skimage("retina"),
                 "a colour fundus photograph of the retina"),
)
BY_NAME = {m.name: m for m in CATALOGUE}
