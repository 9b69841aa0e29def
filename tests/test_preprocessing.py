"""One preprocessing path (issue 11): a scan reaches the model the same way in training and evaluation
(`MultiTaskDataset`'s loader) and in use (`amalgam.predict.load_volume`), and `restore` puts maps back on the file's
grid. Geometries real scans have: anisotropic LPS-stored CT, an oblique direction matrix, a sagittal MR (for a 2D
model, through-plane slicing), with and without a working spacing."""
import nibabel as nib
import numpy as np
import pytest
import torch

from amalgam.data import DataConfig, Preprocessing, _load_case
from amalgam.predict import load_volume

LABELS = {"background": 0, "organ": 1}


def _affine(kind: str) -> np.ndarray:
    if kind == "lps_ct":  # 0.7 x 0.7 x 5 mm, x to the left and y to the back, as DICOM and ITK store it
        a = np.diag([-0.7, -0.7, 5.0, 1.0])
    elif kind == "oblique":  # rotated 17 degrees in-plane
        c, s = np.cos(0.3), np.sin(0.3)
        a = np.eye(4); a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.8, 3.0])
    else:  # sagittal MR: 4 mm between sagittal slices, along the file's x
        a = np.diag([4.0, 1.0, 1.0, 1.0])
    a[:3, 3] = [30.0, -20.0, 10.0]
    return a


def _write(tmp_path, kind):
    rng = np.random.default_rng(0)
    shape = (24, 20, 8) if kind != "sagittal" else (8, 24, 20)
    image = rng.normal(100, 20, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(n // 6, n // 2 + 1) for n in shape)] = 1  # off-centre: a flip or a permutation moves it
    paths = {}
    for name, arr in (("image", image), ("label", label)):
        paths[name] = str(tmp_path / f"{kind}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, _affine(kind)), paths[name])
    return paths, image, label


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("pixdim", [None, (2.5, 1.5, 1.5)])
@pytest.mark.parametrize("kind", ["lps_ct", "oblique", "sagittal"])
def test_training_and_predict_see_the_same_array(tmp_path, kind, pixdim, dims):
    paths, image, label = _write(tmp_path, kind)
    config = DataConfig(spatial_dims=dims, patch_size=(64,) * dims, pixdim={"t": list(pixdim)} if pixdim else None)
    case = _load_case({**paths, "task": "t", "case_id": "c0"}, LABELS, Preprocessing.of(config, "t"))
    scan = load_volume(paths["image"], config, task="t")
    assert torch.equal(case.image, scan.volume)
    np.testing.assert_allclose(case.affine, scan.affine, atol=1e-9)
    if dims == 2:  # slices run through-plane: the first axis has the largest spacing
        spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
        assert spacing[0] == pytest.approx(spacing.max())
    # the label, as a map on the working grid, comes back on the file's grid
    back = scan.restore(case.label.float())[0]
    assert back.shape == label.shape
    if pixdim is None:
        np.testing.assert_array_equal(back, label)
        np.testing.assert_array_equal(scan.restore(scan.volume)[0], image)
    else:  # resampled there and back (linear interpolation, thresholded): the same place, a similar shape
        mask = back > 0.5
        np.testing.assert_allclose(np.argwhere(mask).mean(0), np.argwhere(label).mean(0), atol=1.0)
        assert 2 * (mask & (label > 0)).sum() / (mask.sum() + label.sum()) > 0.75
