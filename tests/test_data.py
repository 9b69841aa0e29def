"Tests of amalgam.data: loading and checking volumes, deterministic task-balanced batches, simulated prompts."
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from amalgam.config import AmalgamError, sha256_file
from amalgam.data import (Batch, BatchStream, DataConfig, MultiTaskDataset, box_from_mask, center_click, class_index,
                          corrective_click, sample_points, task_classes)
from amalgam.manifests import datalist, materialize, split_cases, write_manifest
from amalgam.phantoms import phantom_manifest

# A deliberately awkward grid for the two-channel task: voxel axis i runs along world +y, j along world -z, k along world -x.
ODD_AFFINE = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])
TINY_SHAPE = (20, 18, 16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "Two phantom tasks with unequal case counts (3 and 5 training cases), materialised: (manifest paths, nnUNet_raw)."
    tmp = tmp_path_factory.mktemp("bench")
    paths = []
    for task, n in (("ct_abdomen", 5), ("mr_brain", 8)):
        m = write_manifest(phantom_manifest(task, n_cases=n, shape=(32, 48, 40), root=tmp / "src" / task), tmp / f"{task}.yaml")
        materialize(m, nnunet_raw=tmp / "raw", cache_dir=tmp / "cache")
        paths.append(m)
    return paths, tmp / "raw"


@pytest.fixture(scope="module")
def ds(bench):
    return MultiTaskDataset(bench[0], "train", DataConfig(), root=bench[1])


def _save(arr, path, affine=ODD_AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return {"path": path.relative_to(path.parent.parent).as_posix(), "sha256": sha256_file(path)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A two-channel task on ODD_AFFINE whose first channel is 1000 x (label + 1) (+ noise): (manifest path, nnUNet_raw)."
    tmp = tmp_path_factory.mktemp("tiny")
    g, cases, src = np.random.default_rng(0), [], tmp / "src"
    for i in range(4):
        cid = f"tiny_{i:03d}"
        lab = np.zeros(TINY_SHAPE, np.uint8)
        lab[3 + i:9 + i, 4:12, 2:8] = 1
        lab[11:17, 5:10 + i, 6:12] = 2
        ch0 = (1000.0 * (lab + 1) + g.normal(0, 1, TINY_SHAPE)).astype(np.float32)
        ch1 = g.normal(size=TINY_SHAPE).astype(np.float32)
        cases.append({"id": cid, "images": [_save(ch0, src / "imagesTr" / f"{cid}_0000.nii.gz"), _save(ch1, src / "imagesTr" / f"{cid}_0001.nii.gz")],
                      "label": _save(lab, src / "labelsTr" / f"{cid}.nii.gz")})
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    m = {"schema_version": 1, "task": "tiny", "description": "two-channel test data", "dataset_id": 990, "dataset_name": "Tiny",
         "modality": "MR", "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "pz": 1, "tz": 2},
         "file_ending": ".nii.gz", "label_quality": "synthetic", "licence": "CC0-1.0", "provenance": "made by the test",
         "source": {"kind": "nnunet_raw", "path": str(src)}, "cases": cases,
         "split": {"seed": 0, "fractions": fractions, **split_cases([c["id"] for c in cases], 0, fractions)}}
    path = write_manifest(m, tmp / "tiny.yaml")
    materialize(path, nnunet_raw=tmp / "raw", cache_dir=tmp / "cache")
    return path, tmp / "raw"


def world_check(item, n=200, seed=0):
    "Random tensor-order voxels of `item` hold the values nibabel finds at the same world point."
    g = np.random.default_rng(seed)
    lab_img = nib.load(item["label_path"])
    files = [nib.load(p) for p in item["image_paths"]]
    shape = item["label"].shape[1:]
    for t in np.stack([g.integers(0, s, n) for s in shape], 1):
        world = item["affine"] @ [*t, 1]
        v = np.linalg.solve(lab_img.affine, world)[:3]
        np.testing.assert_allclose(v, np.round(v), atol=1e-3)
        v = tuple(np.round(v).astype(int))
        assert int(item["label"][(0, *t)]) == int(np.asarray(lab_img.dataobj)[v])
        for c, f in enumerate(files):
            assert float(item["image"][(c, *t)]) == pytest.approx(float(np.asarray(f.dataobj)[v]), rel=1e-6)


# ---------------------------------------------------------------- config and vocabulary

def test_config_round_trip_and_errors():
    c = DataConfig(spatial_dims=3, patch_size=(32, 64, 96), pixdim={"ct_abdomen": (3, 1.5, 1.5)}, prompt_modes={"auto": 2, "points": 2})
    assert c.prompt_modes == {"auto": 0.5, "points": 0.5} and c.pixdim == {"ct_abdomen": [3.0, 1.5, 1.5]}
    assert DataConfig.from_dict(c.to_dict()) == c
    for kw, msg in [(dict(spatial_dims=4), "spatial_dims"), (dict(patch_size=(64, 64, 64)), "expected 2 sizes"),
                    (dict(patch_size=(64, 80)), "multiple of 32"), (dict(pos_fraction=-0.1), "pos_fraction"),
                    (dict(box_jitter=2), "box_jitter"), (dict(batch_size=0), "batch_size"), (dict(max_points=0), "max_points"),
                    (dict(prompt_modes={"auto": 0.0}), "positive sum"), (dict(prompt_modes={"auto": -1, "box": 2}), "non-negative"),
                    (dict(prompt_modes={"point": 1}), "did you mean 'points'"), (dict(orientation="RSS"), "orientation"),
                    (dict(pixdim={"ct_abdomen": [1, 1]}), "pixdim['ct_abdomen']"), (dict(seed=-1), "seed")]:
        with pytest.raises(AmalgamError, match=msg.replace("[", r"\[").replace("(", r"\(")): DataConfig(**kw)
    with pytest.raises(AmalgamError, match="did you mean 'box_jitter'"): DataConfig.from_dict({"box_jiter": 0.1})


def test_task_classes_and_class_index(bench):
    tasks = task_classes(bench[0])
    assert tasks == {"ct_abdomen": ["liver", "spleen", "kidney"], "mr_brain": ["lesion", "edema"]}
    assert [class_index(tasks, n) for n in ("ct_abdomen:liver", "ct_abdomen:kidney", "mr_brain:edema")] == [0, 2, 4]
    with pytest.raises(AmalgamError, match="mr_brain:tumour"): class_index(tasks, "mr_brain:tumour")
    with pytest.raises(AmalgamError, match="given twice"): task_classes([bench[0][0], bench[0][0]])


# ---------------------------------------------------------------- loading

def test_phantom_volumes_in_tensor_axis_order(ds, bench):
    assert ds.tasks == ["ct_abdomen", "mr_brain"] and len(ds) == 3 + 5
    assert [len(ds.cases_of(t)) for t in ds.tasks] == [3, 5]
    item = ds[ds.cases_of("mr_brain")[0]]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.long
    assert item["image"].shape == (1, 40, 48, 32) and item["label"].shape == (1, 40, 48, 32)   # (x, y, z) files -> (z, y, x)
    assert item["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    raw = np.asarray(nib.load(item["image_paths"][0]).dataobj)
    np.testing.assert_array_equal(item["image"][0].numpy(), raw.transpose(2, 1, 0).astype(np.float32))  # raw intensities
    world_check(item)
    with pytest.raises(AmalgamError, match="did you mean 'mr_brain'"): ds.cases_of("mr_brian")


def test_reoriented_multichannel_volumes_keep_world_coordinates(tiny):
    config3d = DataConfig(spatial_dims=3, patch_size=(64, 64, 64))
    item = MultiTaskDataset([tiny[0]], "train", config3d, root=tiny[1])[0]
    assert item["image"].shape == (2, 18, 20, 16)   # RAS voxel order (k, i, j) of the file, reversed
    assert item["spacing"] == pytest.approx((1.0, 1.5, 2.0))
    np.testing.assert_array_equal(np.sign(item["affine"][:3, :3]), [[0, 0, 1], [0, 1, 0], [1, 0, 0]])  # RAS, axes reversed
    world_check(item)
    native = MultiTaskDataset([tiny[0]], "train", DataConfig(spatial_dims=3, patch_size=(64, 64, 64), orientation=None),
                              root=tiny[1])[0]
    assert native["image"].shape == (2, 16, 18, 20)   # the file's voxel order, reversed (nnU-Net's reader order)
    world_check(native)
    # a 2D model slices through-plane, as nnU-Net's 2D configuration does: the 2 mm axis comes first
    flat = MultiTaskDataset([tiny[0]], "train", DataConfig(), root=tiny[1])[0]
    assert flat["image"].shape == (2, 16, 18, 20) and flat["spacing"] == pytest.approx((2.0, 1.0, 1.5))
    np.testing.assert_array_equal(flat["image"], item["image"].permute(0, 3, 1, 2))
    world_check(flat)


def test_working_spacing_resamples(bench):
    ds = MultiTaskDataset(bench[0], "train", DataConfig(pixdim={"ct_abdomen": [3.0, 1.6, 1.6]}), root=bench[1])
    ct, mr = ds[ds.cases_of("ct_abdomen")[0]], ds[ds.cases_of("mr_brain")[0]]
    assert ct["spacing"] == pytest.approx((3.0, 1.6, 1.6)) and mr["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    assert ct["label"].shape == ct["image"].shape
    np.testing.assert_allclose(ct["image"].shape[1:], np.array([40 * 1.5 / 3, 48 * 0.8 / 1.6, 32 * 0.8 / 1.6]), atol=1)
    assert set(ct["label"].unique().tolist()) <= {0, 1, 2, 3}
    # the affine still places every resampled voxel: nearest-neighbour labels agree with the native file at the same world point
    native = nib.load(ct["label_path"])
    t = np.indices(ct["label"].shape[1:]).reshape(3, -1)
    v = np.round(np.linalg.solve(native.affine, ct["affine"] @ np.vstack([t, np.ones(t.shape[1])]))[:3]).astype(int)
    ok = ((v >= 0) & (v < np.array(native.shape)[:, None])).all(0)
    agree = np.asarray(native.dataobj)[tuple(v[:, ok])] == ct["label"][0].numpy().reshape(-1)[ok]
    assert ok.mean() > 0.9 and agree.mean() > 0.97
    with pytest.raises(AmalgamError, match="did you mean 'ct_abdomen'"):
        MultiTaskDataset(bench[0], "train", DataConfig(pixdim={"ct_abdomn": [1, 1, 1]}), root=bench[1])


@pytest.fixture
def broken(tiny, tmp_path):
    "A private copy of the tiny dataset, and the files of its first training case."
    root = tmp_path / "raw"
    shutil.copytree(tiny[1], root)
    entry = datalist(tiny[0], "train", root / "Dataset990_Tiny")[0]
    return tiny[0], root, entry["image"], entry["label"]


def test_nan_image_is_reported_with_its_file(broken):
    m, root, images, _ = broken
    img = nib.load(images[1]); a = np.asarray(img.dataobj).copy(); a[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(a, img.affine), images[1])
    with pytest.raises(AmalgamError, match=r"_0001\.nii\.gz: 1 non-finite voxel"): MultiTaskDataset([m], "train", DataConfig(), root=root)


def test_label_shape_mismatch_is_reported(broken):
    m, root, _, label = broken
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 15), np.uint8), ODD_AFFINE), label)
    with pytest.raises(AmalgamError, match=r"tiny_\d+\.nii\.gz: shape \(20, 18, 15\) differs"): MultiTaskDataset([m], "train", DataConfig(), root=root)


def test_unknown_label_value_is_reported(broken):
    m, root, _, label = broken
    lab = np.zeros(TINY_SHAPE, np.uint8); lab[1, 1, 1] = 7
    nib.save(nib.Nifti1Image(lab, ODD_AFFINE), label)
    with pytest.raises(AmalgamError, match=r"\.nii\.gz: label value\(s\) \[7\] not in the manifest's labels"):
        MultiTaskDataset([m], "train", DataConfig(), root=root)


def test_missing_file_and_unknown_split_are_reported(broken, bench):
    m, root, images, _ = broken
    Path(images[0]).unlink()
    with pytest.raises(AmalgamError, match=Path(images[0]).name): MultiTaskDataset([m], "train", DataConfig(), root=root)
    with pytest.raises(AmalgamError, match="did you mean 'val'"): MultiTaskDataset(bench[0], "vall", DataConfig(), root=bench[1])


def test_tasks_with_different_channel_counts_do_not_mix(bench, tiny):
    with pytest.raises(AmalgamError, match="different numbers of image channels"):
        MultiTaskDataset([*bench[0], tiny[0]], "train", DataConfig(), root=bench[1])


# ---------------------------------------------------------------- batches

def same(a: Batch, b: Batch):
    assert a.mode == b.mode and (a.task, a.case_id, a.class_value, a.class_name) == (b.task, b.case_id, b.class_value, b.class_name)
    for x, y in [(a.image, b.image), (a.label, b.label), (a.target, b.target)]: assert torch.equal(x, y)
    assert a.prompts.given().keys() == b.prompts.given().keys()
    for k, v in a.prompts.given().items(): assert torch.equal(v, b.prompts.given()[k])


def test_batches_are_a_pure_function_of_seed_and_step(ds):
    s = BatchStream(ds, DataConfig(batch_size=4))
    same(s.batch(7), BatchStream(ds, DataConfig(batch_size=4)).batch(7))
    same(s.batch(3), s.batch(3))
    assert not torch.equal(s.batch(3).image, s.batch(4).image)
    assert not torch.equal(s.batch(3).image, BatchStream(ds, DataConfig(batch_size=4), seed=1).batch(3).image)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_global_batch(ds, world_size):
    s = BatchStream(ds, DataConfig(batch_size=6))
    for step in range(6):
        whole = s.batch(step)
        parts = [s.batch(step, r, world_size) for r in range(world_size)]
        for r, p in enumerate(parts):
            idx = list(range(r, 6, world_size))
            assert p.case_id == [whole.case_id[i] for i in idx] and p.mode == whole.mode
            assert torch.equal(p.image, whole.image[idx]) and torch.equal(p.target, whole.target[idx])
            for k, v in p.prompts.given().items(): assert torch.equal(v, whole.prompts.given()[k][idx])
    with pytest.raises(AmalgamError, match="world_size"): s.batch(0, 0, 7)
    with pytest.raises(AmalgamError, match="rank"): s.batch(0, 2, 2)
    with pytest.raises(AmalgamError, match="step"): s.batch(-1)


def test_tasks_are_balanced_whatever_their_case_counts(ds):
    s = BatchStream(ds, DataConfig(batch_size=3))   # 3 training cases of ct_abdomen, 5 of mr_brain
    tasks = [s.task_of(e) for e in range(600)]
    assert tasks.count("ct_abdomen") == 300
    assert all(len(set(tasks[i:i + 2])) == 2 for i in range(0, 600, 2))   # each pair of consecutive elements covers both tasks
    # classes, modes: chi-square against the intended probabilities (p < 0.001 thresholds, fixed seeds)
    elems = [s.batch(step) for step in range(120)]
    values = [v for b in elems for t, v in zip(b.task, b.class_value) if t == "mr_brain"]
    counts = np.bincount(values, minlength=3)[1:]
    assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 10.8   # both brain classes are in every case: uniform
    modes = [s.mode_of(step) for step in range(600)]
    obs, exp = np.array([modes.count(m) for m in ("auto", "box", "points")]), 600 * np.array([0.4, 0.3, 0.3])
    assert ((obs - exp) ** 2 / exp).sum() < 13.8


def test_prompted_classes_are_in_their_patches(ds):
    s = BatchStream(ds, DataConfig(batch_size=4, pos_fraction=1.0, patch_size=(32, 32), box_jitter=0.0))
    vocab = [f"{t}:{c}" for t, cs in ds.classes.items() for c in cs]
    for step in range(40):
        b = s.batch(step)
        b.prompts.validate(b.image.shape[2:], batch_size=4, num_classes=len(vocab))
        assert b.image.shape == (4, 1, 32, 32) and b.label.dtype == torch.long and b.target.dtype == torch.float32
        assert torch.equal(b.target, (b.label == torch.tensor(b.class_value).view(4, 1, 1, 1)).float())
        assert (b.target.flatten(1).sum(1) > 0).all()
        assert all(n.split(":")[0] == t and ds.labels[t][n.split(":")[1]] == v for n, t, v in zip(b.class_name, b.task, b.class_value))
        for i in range(4):
            m = b.target[i, 0].bool()
            if b.mode == "auto": assert vocab[b.prompts.classes[i]] == b.class_name[i]
            elif b.mode == "box": assert torch.equal(b.prompts.boxes[i], box_from_mask(m, 0.0, None))
            else:
                lab, pts = b.prompts.point_labels[i], b.prompts.points[i].long()
                real = lab != -1
                assert (lab[0] == 1) and real.sum() >= 1 and not real[real.sum():].any()   # positives first, padding last
                assert all(bool(m[tuple(p)]) == bool(l) for p, l in zip(pts[real], lab[real]))


def test_auto_class_indices_follow_the_models_vocabulary(ds):
    vocab = {"ct_lung": ["lung", "nodule"], **ds.classes}
    b = next(b for b in (BatchStream(ds, DataConfig(), tasks=vocab).batch(s) for s in range(20)) if b.mode == "auto")
    names = [f"{t}:{c}" for t, cs in vocab.items() for c in cs]
    assert [names[i] for i in b.prompts.classes] == b.class_name
    with pytest.raises(AmalgamError, match="lacks"): BatchStream(ds, DataConfig(), tasks={"ct_abdomen": ["liver"]})


def test_augmentation_keeps_image_and_label_aligned(tiny):
    ds = MultiTaskDataset([tiny[0]], "train", DataConfig(), root=tiny[1])
    raw = BatchStream(ds, DataConfig(augment=False, patch_size=(32, 32), batch_size=8))
    aug = BatchStream(ds, DataConfig(augment=True, patch_size=(32, 32), batch_size=8))
    values = np.concatenate([np.unique(ds[i]["image"][0].numpy()) for i in range(len(ds))])
    changed = 0
    for step in range(10):
        b, a = raw.batch(step), aug.batch(step)
        assert np.isin(b.image[:, 0].numpy(), values).all()   # raw intensities (padding: the case's minimum)
        # channel 0 is 1000 x (label + 1): after flips and rotations it still encodes the label exactly
        decoded = torch.round(a.image[:, 0] / 1000) - 1
        assert torch.equal(decoded.long(), a.label[:, 0])
        # augmentation moves voxels and never changes an intensity: a CT expert's fixed HU window must see true values
        assert np.isin(a.image[:, 0].numpy(), values).all()
        changed += not torch.equal(a.label, b.label)
    assert changed > 5


def test_3d_batches(ds):
    s = BatchStream(ds, DataConfig(spatial_dims=3, patch_size=(64, 64, 64), batch_size=2, augment=False))
    minimum = {ds[i]["case_id"]: ds[i]["image"].min() for i in range(len(ds))}
    for step in range(6):
        b = s.batch(step)
        assert b.image.shape == (2, 1, 64, 64, 64) and b.target.shape == (2, 1, 64, 64, 64)
        b.prompts.validate((64, 64, 64), batch_size=2)
        for k in ("points", "boxes"):
            if b.prompts.given().get(k) is not None: assert b.prompts.given()[k].shape[-1] == 3
        # the volume (40 x 48 x 32) is smaller than the patch: the rest is padding at the case's minimum, label background
        for i in range(2):
            pad = (b.image[i, 0] == minimum[b.case_id[i]]) & (b.label[i, 0] == 0)
            assert pad.sum() >= 64 ** 3 - 40 * 48 * 32
    assert b.to("cpu").image is not None and len(b) == 2


# ---------------------------------------------------------------- prompt simulation

def ball(shape, centre, r):
    g = np.indices(shape)
    return torch.from_numpy(sum((x - c) ** 2 for x, c in zip(g, centre)) <= r * r)


def test_boxes_2d_and_3d():
    for m in (ball((20, 30), (8, 12), 4), ball((16, 20, 24), (6, 9, 12), 4)):
        idx = m.nonzero()
        tight = box_from_mask(m, 0.0, np.random.default_rng(0))
        assert torch.equal(tight, torch.stack([idx.min(0).values, idx.max(0).values]).float())
        assert torch.equal(box_from_mask(m, 0.3, None), tight)
        g = np.random.default_rng(1)
        boxes = torch.stack([box_from_mask(m, 0.5, g) for _ in range(50)])
        size = tight[1] - tight[0] + 1
        assert (boxes[:, 0] <= tight[0]).all() and (boxes[:, 1] >= tight[1]).all()
        assert (boxes[:, 0] >= torch.clamp(tight[0] - 0.5 * size, min=0)).all() and (boxes[:, 1] <= torch.tensor(m.shape) - 1).all()
        assert (boxes[:, 0] < tight[0]).any()
    edge = torch.zeros(10, 10, dtype=torch.bool); edge[0:4, 6:10] = True
    b = box_from_mask(edge, 1.0, np.random.default_rng(0))
    assert b[0, 0] == 0 and b[1, 1] == 9   # clipped to the image
    with pytest.raises(AmalgamError, match="empty mask"): box_from_mask(torch.zeros(5, 5, 5, dtype=torch.bool), 0.1, None)


def test_sample_points_2d_and_3d():
    for m in (ball((20, 30), (8, 12), 4), ball((16, 20, 24), (6, 9, 12), 4)):
        pts, lab = sample_points(m, 3, 2, np.random.default_rng(0))
        assert pts.shape == (5, m.ndim) and pts.dtype == torch.float32 and lab.tolist() == [1, 1, 1, 0, 0]
        assert [bool(m[tuple(p)]) for p in pts.long()] == [True] * 3 + [False] * 2
        assert len({tuple(p.tolist()) for p in pts[:3]}) == 3   # distinct while the object is big enough
    one = torch.zeros(6, 6, dtype=torch.bool); one[2, 3] = True
    pts, _ = sample_points(one, 2, 0, np.random.default_rng(0))
    assert pts.tolist() == [[2.0, 3.0], [2.0, 3.0]]
    with pytest.raises(AmalgamError, match="no foreground"): sample_points(torch.zeros(4, 4, dtype=torch.bool), 1, 0, np.random.default_rng(0))


def test_corrective_click_goes_to_the_larger_error():
    target = ball((24, 24, 24), (12, 12, 12), 7)
    pred = target.clone(); pred[:, :, 12:] = False                 # misses half the ball
    pred |= ball((24, 24, 24), (3, 3, 3), 1)                        # and adds a small false blob
    coord, label = corrective_click(pred, target)
    fn = (target & ~pred).numpy()
    assert label == 1 and fn[tuple(coord.long())]
    dist = ndimage.distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1, 1:-1]
    assert dist[tuple(coord.long())] == dist.max()
    coord2, _ = corrective_click(pred, target, np.random.default_rng(3))
    assert dist[tuple(coord2.long())] == dist.max()
    fp_pred = target | ball((24, 24, 24), (18, 5, 5), 4)             # only false positives
    coord, label = corrective_click(fp_pred, target)
    assert label == 0 and (fp_pred & ~target)[tuple(coord.long())]
    assert corrective_click(target, target) is None
    coord, label = corrective_click(torch.zeros(20, 20, dtype=torch.bool), ball((20, 20), (10, 10), 5))   # 2D, nothing predicted
    assert (label, coord.tolist()) == (1, [10.0, 10.0])
    with pytest.raises(AmalgamError, match="shape"): corrective_click(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool))


def test_center_click():
    assert center_click(ball((24, 26, 28), (10, 13, 15), 5)).tolist() == [10.0, 13.0, 15.0]
    assert center_click(ball((30, 30), (4, 20), 3)).tolist() == [4.0, 20.0]
    with pytest.raises(AmalgamError, match="empty mask"): center_click(torch.zeros(3, 3, dtype=torch.bool))
