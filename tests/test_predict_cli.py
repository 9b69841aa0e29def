"""`amalgam predict`: NIfTI geometry round trip, NRRD/MHA/DICOM inputs, orientation, voxel vs world prompts, 2D/3D runs, resampling, and bad
input (exit code 2, one line on stderr naming the file, no output written)."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from amalgam.predict import load_volume, predict_cli
from amalgam.segmenter import Segmenter
from scans import itk_image, write_dicom_series
from test_infer import make_run  # the tiny run-folder builder shared with the Python API tests


@pytest.fixture(scope="module")
def run3d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli3") / "run")


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli2") / "run", 2, (64, 64), pixdim={"demo": [1.0, 0.8, 0.8]})


LPS = np.array([[-1.2, 0, 0, 30.0], [0, -0.9, 0, 20.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])


def write_nii(path, data, affine=LPS, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine, code=1); img.header.set_sform(affine, code=2)
    img.header["descrip"] = b"amalgam test"
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def volume(shape=(20, 24, 32), seed=0):
    return np.random.default_rng(seed).normal(100, 50, shape)


def prompts_file(path, spec):
    path.write_text(json.dumps(spec))
    return str(path)


def test_round_trip_keeps_geometry_and_header(tmp_path, run3d, capsys):
    src = write_nii(tmp_path / "case_a.nii.gz", volume(), dtype=np.int16)
    spec = prompts_file(tmp_path / "p.json", {"box": [[3, 4, 5], [15, 20, 25]], "points": [[9, 12, 15]]})
    out = tmp_path / "out"
    rc = predict_cli(["-r", str(run3d), "-i", str(src), "-o", str(out), "--prompts", spec, "--save-probabilities", "--save-weights"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case_a.nii.gz", "case_a_probability.nii.gz", "case_a_weights_demo.nii.gz", "case_a_weights_foundation.nii.gz"]
    inp, mask = nib.load(src), nib.load(out / "case_a.nii.gz")
    assert mask.shape == inp.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, inp.affine)
    for key in ("pixdim", "qform_code", "sform_code", "descrip", "xyzt_units", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(mask.header[key], inp.header[key], err_msg=key)
    m = np.asarray(mask.dataobj)
    prob = nib.load(out / "case_a_probability.nii.gz").get_fdata()
    assert set(np.unique(m)) <= {0, 1} and 0 < m.sum() < m.size
    np.testing.assert_array_equal(m, (prob > 0.5).astype(np.uint8))
    w = sum(nib.load(out / f"case_a_weights_{n}.nii.gz").get_fdata() for n in ("demo", "foundation"))
    np.testing.assert_allclose(w, 1, atol=1e-4)
    # the same mask as the Python API on the prepared volume, mapped back to the file's grid
    seg = Segmenter.from_run(run3d)
    case = load_volume(src, seg.data_config)
    box = np.array([[3, 4, 5], [15, 20, 25]], float)
    # LPS file -> RAS working grid, tensor axis order: x and y are flipped, then the axes reversed
    flip = lambda v: np.stack([v[:, 2], 24 - 1 - v[:, 1], 20 - 1 - v[:, 0]], 1)
    wb = flip(box); wbox = np.stack([wb.min(0), wb.max(0)])
    res = seg.segment(case.volume, box=wbox, points=flip(np.array([[9.0, 12, 15]])), return_probability=True)
    np.testing.assert_array_equal(case.restore(torch.from_numpy(res.probability[None]))[0] > 0.5, m.astype(bool))
    assert str(out / "case_a.nii.gz") in capsys.readouterr().out


def test_orientation_on_disk_does_not_change_the_result(tmp_path, run3d):
    "The same physical image stored LPS and RAS, prompted in world coordinates, gives the same mask up to the storage flip."
    data = volume(seed=1)
    ras = LPS.copy(); ras[:2, :3] *= -1
    ras[:3, 3] = LPS[:3, :3] @ [19, 23, 0] + LPS[:3, 3]  # the RAS file's first voxel is the LPS file's last in x and y
    write_nii(tmp_path / "lps.nii.gz", data)
    write_nii(tmp_path / "ras.nii.gz", data[::-1, ::-1], ras)
    world = nib.affines.apply_affine(LPS, [[4, 5, 6], [16, 20, 26]])
    spec = prompts_file(tmp_path / "p.json", {"coordinate_system": "world", "box": [world.min(0).tolist(), world.max(0).tolist()]})
    assert predict_cli(["-r", str(run3d), "-i", str(tmp_path / "lps.nii.gz"), str(tmp_path / "ras.nii.gz"), "-o", str(tmp_path / "o"), "--prompts", spec]) == 0
    a, b = (np.asarray(nib.load(tmp_path / "o" / f"{n}.nii.gz").dataobj) for n in ("lps", "ras"))
    assert a.sum() > 0
    np.testing.assert_array_equal(a, b[::-1, ::-1])


def test_world_and_voxel_prompts_give_the_same_mask(tmp_path, run3d):
    data = volume(seed=2)
    for n in ("v", "w"): write_nii(tmp_path / f"{n}.nii.gz", data)
    vox = np.array([[5.0, 6, 7], [14, 18, 24]])
    mm = nib.affines.apply_affine(LPS, vox)
    click_mm = nib.affines.apply_affine(LPS, [[10, 11, 12]])
    spec = prompts_file(tmp_path / "p.json", {"cases": {
        "v.nii.gz": {"box": vox.tolist(), "points": [[10, 11, 12]], "point_labels": [1]},
        "w": {"coordinate_system": "world", "box": [mm.min(0).tolist(), mm.max(0).tolist()], "points": click_mm.tolist()}}})
    assert predict_cli(["-r", str(run3d), "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--prompts", spec]) == 0
    v, w = (np.asarray(nib.load(tmp_path / "o" / f"{n}.nii.gz").dataobj) for n in ("v", "w"))
    assert v.sum() > 0
    np.testing.assert_array_equal(v, w)


def test_2d_run_automatic_mode_with_resampling(tmp_path, run2d):
    "A 2D run segments slice-wise along the first tensor axis (the file's z); its task's pixdim resamples and the mask comes back on the input grid."
    src = write_nii(tmp_path / "c.nii.gz", volume((50, 45, 3), seed=3), np.diag([0.7, 0.7, 1.0, 1.0]))
    assert predict_cli(["-r", str(run2d), "-i", str(src), "-o", str(tmp_path / "o"), "--auto", "--task", "demo:cube",
                        "--save-probabilities"]) == 0
    mask = nib.load(tmp_path / "o" / "c.nii.gz")
    assert mask.shape == (50, 45, 3)
    np.testing.assert_allclose(mask.affine, nib.load(src).affine)
    prob = nib.load(tmp_path / "o" / "c_probability.nii.gz").get_fdata()
    assert (prob.reshape(-1, 3).max(0) > 0).all()  # automatic mode runs on every slice



def test_whole_task_writes_one_label_map_with_the_tasks_label_values(tmp_path):
    "--auto --task TASK (several classes): one label map with the run's label values, equal to the per-class answers."
    run = make_run(tmp_path / "run", 2, (64, 64))
    values = {"background": 0, "ball": 3, "cube": 7}  # not consecutive: the map must carry the task's own values
    cfg = json.loads((run / "config.json").read_text())
    cfg["experts"][0]["labels"] = values
    (run / "config.json").write_text(json.dumps(cfg))
    dj = Path(cfg["experts"][0]["folder"]) / "dataset.json"
    dj.write_text(json.dumps({**json.loads(dj.read_text()), "labels": values}))
    src = write_nii(tmp_path / "c.nii.gz", volume((50, 45, 3), seed=3), np.diag([0.7, 0.7, 1.0, 1.0]))
    out = tmp_path / "o"
    assert predict_cli(["-r", str(run), "-i", str(src), "-o", str(out), "--auto", "--task", "demo",
                        "--save-probabilities"]) == 0
    labels = np.asarray(nib.load(out / "c.nii.gz").dataobj)
    probs = nib.load(out / "c_probabilities.nii.gz").get_fdata()
    assert labels.shape == (50, 45, 3) and probs.shape == (50, 45, 3, 2) and labels.dtype == np.uint8
    assert json.loads((out / "c_probabilities.json").read_text()) == {
        "task": "demo", "classes": ["ball", "cube"], "label_values": [3, 7], "axis": 3}
    for i, cls in enumerate(("ball", "cube")):  # each channel is what the class alone gives
        assert predict_cli(["-r", str(run), "-i", str(src), "-o", str(tmp_path / cls), "--auto", "--task",
                            f"demo:{cls}", "--save-probabilities"]) == 0
        np.testing.assert_allclose(probs[..., i], nib.load(tmp_path / cls / "c_probability.nii.gz").get_fdata(), atol=1e-6)
    expected = np.where(probs.max(-1) > 0.5, np.array([3, 7])[probs.argmax(-1)], 0)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) <= {0, 3, 7} and (labels > 0).any(), np.unique(labels)
    assert predict_cli(["-r", str(run), "-i", str(src), "-o", str(tmp_path / "w"), "--auto", "--task", "demo",
                        "--save-weights"]) == 2 and not (tmp_path / "w").exists()  # weight maps are per class

def _bad(tmp_path, run3d, run2d):
    "name -> (argv builder, expected text on stderr); each leaves tmp_path/out absent or empty."
    good = write_nii(tmp_path / "good.nii.gz", volume(seed=4))
    box = prompts_file(tmp_path / "box.json", {"box": [[1, 1, 1], [10, 10, 10]]})
    r = ["-r", str(run3d), "-o", str(tmp_path / "out")]

    def garbage():
        (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
        return r + ["-i", str(good), str(tmp_path / "broken.nii.gz"), "--prompts", box], "broken.nii.gz: unreadable NIfTI"

    def flat():
        return r + ["-i", str(write_nii(tmp_path / "flat.nii.gz", volume((20, 24, 1)))), "--auto", "--task", "demo:ball"], "flat.nii.gz: a 2D image"

    def nans():
        v = volume(); v[3, 4, 5] = np.nan
        return r + ["-i", str(good), str(write_nii(tmp_path / "nan.nii.gz", v)), "--prompts", box], "nan.nii.gz: contains 1 NaN"

    def outside():
        spec = prompts_file(tmp_path / "o.json", {"points": [[5, 5, 40]]})
        return r + ["-i", str(good), "--prompts", spec], "good.nii.gz): point [5.0, 5.0, 40.0] (voxel coordinates) is outside the image"

    def flipped():
        spec = prompts_file(tmp_path / "f.json", {"box": [[10, 1, 1], [1, 10, 10]]})
        return r + ["-i", str(good), "--prompts", spec], "flipped"

    def unknown_task():
        return r + ["-i", str(good), "--auto", "--task", "liver"], "--task: task 'liver': not in the class vocabulary"

    def unknown_task_in_file():
        spec = prompts_file(tmp_path / "t.json", {"box": [[1, 1, 1], [10, 10, 10]], "task": "demo:sphere"})
        return r + ["-i", str(good), "--prompts", spec], "t.json (good.nii.gz): task 'demo:sphere'"

    def no_checkpoint():
        run = tmp_path / "unfinished"; run.mkdir()
        (run / "config.json").write_text((run3d / "config.json").read_text())
        return ["-r", str(run), "-o", str(tmp_path / "out"), "-i", str(good), "--prompts", box], "model.pt"

    def missing():
        return r + ["-i", str(good), str(tmp_path / "nope.nii.gz"), "--prompts", box], "nope.nii.gz: input file not found"

    def bad_json():
        (tmp_path / "j.json").write_text("{box: [")
        return r + ["-i", str(good), "--prompts", str(tmp_path / "j.json")], "j.json: not valid JSON"

    def stray_case():
        spec = prompts_file(tmp_path / "s.json", {"cases": {"other.nii.gz": {"box": [[1, 1, 1], [2, 2, 2]]}}})
        return r + ["-i", str(good), "--prompts", spec], "s.json: cases ['other.nii.gz'] match no input file"

    def bad_device():
        return ["-r", str(run2d), "-o", str(tmp_path / "out"), "-i", str(good), "--auto", "--task", "demo:ball", "--save-weights",
                "--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "--device"

    return dict(garbage=garbage, flat=flat, nans=nans, outside=outside, flipped=flipped, unknown_task=unknown_task,
                unknown_task_in_file=unknown_task_in_file, no_checkpoint=no_checkpoint, missing=missing, bad_json=bad_json,
                stray_case=stray_case, bad_device=bad_device)


@pytest.mark.parametrize("case", ["garbage", "flat", "nans", "outside", "flipped", "unknown_task", "unknown_task_in_file",
                                  "no_checkpoint", "missing", "bad_json", "stray_case", "bad_device"])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, run3d, run2d, case, capsys):
    argv, expected = _bad(tmp_path, run3d, run2d)[case]()
    capsys.readouterr()
    assert predict_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amalgam predict: ") and expected in err[0], err
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_nrrd_mha_and_dicom_inputs_give_the_nifti_inputs_mask(tmp_path, run3d):
    "One scan as NIfTI, NRRD, MHA and a DICOM series, prompted with one world box: the same mask, as NIfTI, for each."
    data = np.round(volume(seed=4)).astype(np.int16)
    (tmp_path / "in").mkdir()
    write_nii(tmp_path / "in" / "a.nii.gz", data, dtype=np.int16)
    img = itk_image(data, LPS)
    sitk.WriteImage(img, str(tmp_path / "in" / "b.nrrd")); sitk.WriteImage(img, str(tmp_path / "in" / "c.mha"))
    write_dicom_series(img, tmp_path / "d")
    world = nib.affines.apply_affine(LPS, [[4, 5, 6], [16, 20, 26]])
    spec = prompts_file(tmp_path / "p.json", {"coordinate_system": "world",
                                              "box": [world.min(0).tolist(), world.max(0).tolist()]})
    out = tmp_path / "o"
    assert predict_cli(["-r", str(run3d), "-i", str(tmp_path / "in"), str(tmp_path / "d"), "-o", str(out),
                        "--prompts", spec]) == 0
    masks = {n: nib.load(out / f"{n}.nii.gz") for n in ("a", "b", "c", "d")}
    assert masks["a"].get_fdata().sum() > 0
    for n, m in masks.items():
        np.testing.assert_allclose(m.affine, LPS, atol=1e-5, err_msg=n)
        np.testing.assert_array_equal(np.asarray(m.dataobj), np.asarray(masks["a"].dataobj), err_msg=n)
