"""Scans in the formats `amalgam predict` reads besides NIfTI, written with SimpleITK: NRRD/MHA files and DICOM series
(one file per slice with the position, orientation and spacing tags a scanner writes)."""
import contextlib
import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def itk_image(data_xyz, affine_ras) -> sitk.Image:
    "The scan a NIfTI of array `data_xyz` (x, y, z) and RAS+ `affine_ras` describes, as an ITK image (LPS)."
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data_xyz).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist()); img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    return img


@contextlib.contextmanager
def kept_locale():
    "Restore the process's locale afterwards: GDCM's DICOM writer sets the C locale, and with it ASCII as Python's default encoding."
    saved = locale.setlocale(locale.LC_ALL)
    try: yield
    finally: locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(img: sitk.Image, folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.9001") -> Path:
    "`img` (integer voxels) as a DICOM series of series UID `uid` in `folder`, one file per slice."
    with kept_locale(): return _write_dicom_series(img, folder, uid)


def _write_dicom_series(img: sitk.Image, folder: Path, uid: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w, d = sitk.ImageFileWriter(), img.GetDirection()
    w.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, v in (("0020|000e", uid), ("0008|0060", "CT"), ("0020|0013", str(k)),
                       ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
                       ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k))))),
                       ("0028|0030", "\\".join(map(str, img.GetSpacing()[:2]))), ("0018|0050", str(img.GetSpacing()[2]))):
            sl.SetMetaData(tag, v)
        w.SetFileName(str(folder / f"{uid[-4:]}_{k:03d}.dcm")); w.Execute(sl)
    return folder
