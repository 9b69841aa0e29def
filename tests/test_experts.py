"""amalgam.experts against the real nnU-Net: train one smoke expert once (module fixture), load it from its folder and
from nnU-Net's own zip export, check feature shapes, agreement with nnUNetv2_predict, and every bad input."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from amalgam.config import AmalgamError
from amalgam.experts import (CPU_PLANS, CPU_TRAINER, FULL_TRAINER, SMOKE_TRAINER, Expert, ExpertBank, FeatureSpec,
                             NnUNetPaths, read_image, save_model_folder, train_expert, training_summary)
from tiny_experts import tiny_test_expert

LABELS = {"background": 0, "sphere": 1, "ball": 2}
CONFIG = "2d"  # 2D trains ~3x faster on CPU; 3D experts are covered with tiny experts and by nbs/03_experts


def make_raw_dataset(raw: Path, dataset_id: int = 990, n_train: int = 8, n_test: int = 2, shape=(32, 32, 32), bad_label: bool = False) -> Path:
    "A tiny CT-like nnU-Net raw dataset: two spheres of different intensity in noise; anisotropic spacing so nnU-Net transposes axes."
    d = raw / f"Dataset{dataset_id:03d}_TinyBlobs"
    g = np.random.default_rng(dataset_id)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        (d / f"images{split}").mkdir(parents=True, exist_ok=True); (d / f"labels{split}").mkdir(parents=True, exist_ok=True)
        lab = np.zeros(shape, np.uint8)
        for r, v in ((7, 1), (5, 2)):
            c = g.integers(r + 2, np.array(shape) - r - 2)
            lab[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = v
        if bad_label and i == 0: lab[0, 0, 0] = 7
        img = g.normal(0, 20, shape) + np.array([-100.0, 60.0, 200.0])[lab.clip(0, 2)]
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), d / f"images{split}" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), d / f"labels{split}" / f"case_{i:03d}.nii.gz")
    (d / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_train,
                                                "file_ending": ".nii.gz", "amalgam_task": "tiny_blobs"}))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    raw = make_raw_dataset(ws / "my_raw")
    t0 = time.time()
    model = train_expert(raw, configuration=CONFIG, trainer=SMOKE_TRAINER, device="cpu", workspace_dir=ws)
    return {"ws": ws, "raw": raw, "model": model, "seconds": time.time() - t0}


def test_training_writes_nnunet_results(trained):
    model, ws = trained["model"], trained["ws"]
    assert model == ws / "nnUNet_results" / "Dataset990_TinyBlobs" / f"{SMOKE_TRAINER}__{CPU_PLANS}__{CONFIG}"
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth", "fold_0/validation/summary.json"):
        assert (model / f).is_file(), f
    staging = [p for d in ("preprocessed", "results") for p in (ws / f"nnUNet_{d}").iterdir() if p.name.startswith(".")]
    assert staging == []
    splits = json.loads((ws / "nnUNet_preprocessed" / "Dataset990_TinyBlobs" / "splits_final.json").read_text())
    assert len(splits) == 5  # a raw nnU-Net folder keeps nnU-Net's own 5-fold split
    s = training_summary(model)
    assert set(s["dice"]) == {"sphere", "ball"} and all(0 <= v <= 1 for v in s["dice"].values())
    assert len(s["curves"]["train_losses"]) == 10 and len(s["curves"]["epoch_seconds"]) == 10
    print(f"smoke training (plan, preprocess, train, validate): {trained['seconds']:.0f} s")


def test_training_again_reuses_the_model(trained):
    ckpt = trained["model"] / "fold_0" / "checkpoint_final.pth"
    before = ckpt.stat().st_mtime_ns
    assert train_expert(trained["raw"], configuration=CONFIG, workspace_dir=trained["ws"]) == trained["model"]
    assert ckpt.stat().st_mtime_ns == before


def test_load_from_folder_and_from_nnunet_zip(trained, tmp_path):
    model = trained["model"]
    expert = Expert.from_folder(model, labels=LABELS)
    assert (expert.task, expert.labels, expert.spatial_dims, expert.in_channels, expert.num_classes) == ("tiny_blobs", LABELS, 2, 1, 3)
    assert not expert.network.training and not any(p.requires_grad for p in expert.network.parameters())
    zip_path = tmp_path / "expert.zip"
    paths = NnUNetPaths.under(trained["ws"])
    cli = Path(sys.executable).parent / "nnUNetv2_export_model_to_zip"
    subprocess.run([str(cli), "-d", "990", "-o", str(zip_path), "-c", CONFIG, "-tr", SMOKE_TRAINER, "-p", CPU_PLANS,
                    "-f", "0"],
                   env=paths.env(), check=True, capture_output=True)
    zipped = Expert.from_zip(zip_path, extract_to=tmp_path / "unzipped", name="from_zip")
    x = torch.randn(1, 1, *expert.patch_size) * 100
    assert torch.equal(zipped.predict(x), expert.predict(x))
    assert zipped.name == "from_zip" and zipped.source.name == model.name


def test_feature_shapes_and_strides(trained):
    expert = Expert.from_folder(trained["model"])
    arch = expert.configuration_manager.network_arch_init_kwargs
    assert [s.channels for s in expert.feature_specs] == list(arch["features_per_stage"])
    assert expert.feature_specs[0].stride == (1, 1)
    assert all(b.stride[i] in (a.stride[i], 2 * a.stride[i]) for a, b in zip(expert.feature_specs, expert.feature_specs[1:]) for i in range(2))
    x = torch.randn(2, 1, 32, 40) * 100
    feats = expert.features(x)
    for f, spec in zip(feats, expert.feature_specs, strict=True):
        assert tuple(f.shape) == (2, spec.channels, *[-(-n // s) for n, s in zip(x.shape[2:], spec.stride)])
    assert torch.equal(expert.features(expert.normalize(x), normalized=True)[-1], feats[-1])


def test_expert_agrees_with_nnunet_predictor(trained, tmp_path, monkeypatch):
    """nnU-Net's own nnUNetPredictor and Expert.segment_image give the same masks on held-out cases: at least 99.9 % of voxels
    agree, and every voxel where they differ is one nnU-Net itself is undecided about (its two most likely classes within
    0.02 of each other). Not exact: amalgam normalises in torch, nnU-Net in NumPy, and the last-bit rounding differences
    flip near-tied voxels of a barely trained smoke expert; on a small structure a handful of such voxels can move its
    Dice a lot (seen: 0.82), which is why agreement is judged by nnU-Net's own margin rather than by a Dice threshold."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    raw, paths = trained["raw"], NnUNetPaths.under(trained["ws"])
    monkeypatch.setenv("nnUNet_extTrainer", str(paths.trainers))  # how nnU-Net finds the smoke trainer named in the checkpoint
    cases = sorted(raw.joinpath("imagesTs").glob("*_0000.nii.gz"))
    assert len(cases) == 2
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained["model"]), use_folds=(0,))
    out = tmp_path / "pred"
    out.mkdir()
    predictor.predict_from_files_sequential([[str(c)] for c in cases], str(out), save_probabilities=True, overwrite=True)
    expert = Expert.from_folder(trained["model"])
    for image_file in cases:
        cid = image_file.name.replace("_0000.nii.gz", "")
        theirs = np.asarray(nib.load(out / f"{cid}.nii.gz").dataobj)
        ours = expert.segment_image(*read_image(expert, [image_file]))
        ours = ours.transpose(2, 1, 0)  # nnU-Net's SimpleITK reader gives z, y, x; nibabel x, y, z
        assert ours.shape == theirs.shape
        assert (theirs > 0).any()  # agreement on an empty prediction would prove nothing
        assert (ours == theirs).mean() >= 0.999, (cid, (ours != theirs).sum())
        probs = np.load(out / f"{cid}.npz")["probabilities"].transpose(0, 3, 2, 1)  # z, y, x like the reader -> x, y, z
        assert np.array_equal(probs.argmax(0), theirs)  # nnU-Net's mask is the argmax of these probabilities
        top2 = np.sort(probs, axis=0)[-2:]
        margin = (top2[1] - top2[0])[ours != theirs]
        assert margin.size == 0 or margin.max() < 0.02, (cid, margin.max())


def test_bank_of_trained_and_tiny_experts(trained):
    bank = ExpertBank([Expert.from_folder(trained["model"], name="blobs"), tiny_test_expert(spatial_dims=2, name="tiny")])
    out = bank.features(torch.randn(1, 1, 32, 32))
    assert list(out) == ["blobs", "tiny"] and not any(f.is_inference() or f.requires_grad for fs in out.values() for f in fs)
    assert bank.describe()[0]["task"] == "tiny_blobs" and bank.describe()[0]["labels"] == LABELS
    assert bank.feature_specs["tiny"][-1] == FeatureSpec(32, (4, 4))


# ---- bad input: a clear AmalgamError naming the model folder and the problem, nothing half-written ----

def test_missing_folder_fold_and_checkpoint(trained, tmp_path):
    model = trained["model"]
    with pytest.raises(AmalgamError, match="model folder not found"): Expert.from_folder(tmp_path / "nope")
    with pytest.raises(AmalgamError, match=r"no fold 4 .*available: \['fold_0'\]"): Expert.from_folder(model, fold=4)
    with pytest.raises(AmalgamError, match="no checkpoint_latest.pth"): Expert.from_folder(model, checkpoint="checkpoint_latest.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AmalgamError, match=r"empty: not an nnU-Net model folder \(no plans.json\)"): Expert.from_folder(tmp_path / "empty")
    with pytest.raises(AmalgamError, match="model zip not found"): Expert.from_zip(tmp_path / "x.zip")
    (tmp_path / "x.zip").write_text("not a zip")
    with pytest.raises(AmalgamError, match="not a zip file"): Expert.from_zip(tmp_path / "x.zip")


def test_checkpoint_plans_mismatch(trained, tmp_path):
    bad = tmp_path / "Dataset990_TinyBlobs" / trained["model"].name
    shutil.copytree(trained["model"], bad)
    plans = json.loads((bad / "plans.json").read_text())
    plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["features_per_stage"][0] = 24
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AmalgamError, match=f"{bad.name}: checkpoint / plans mismatch"): Expert.from_folder(bad)
    del plans["configurations"][CONFIG]
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AmalgamError, match=f"plans.json has no configuration '{CONFIG}'"): Expert.from_folder(bad)


def test_wrong_channels_labels_and_dimensionality(trained):
    expert = Expert.from_folder(trained["model"])
    with pytest.raises(AmalgamError, match=r"expects 1 channel\(s\).*got 2"): expert.features(torch.zeros(1, 2, 32, 32))
    with pytest.raises(AmalgamError, match=f"{trained['model'].name}: the expert's labels .* differ"):
        Expert.from_folder(trained["model"], labels={"background": 0, "liver": 1, "spleen": 2})
    with pytest.raises(AmalgamError, match=f"{trained['model'].name}: a 2D expert .* for features"): expert.features(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(AmalgamError, match="a 3D expert"): tiny_test_expert(spatial_dims=3).features(torch.zeros(1, 1, 32, 32))


def test_bad_dataset_leaves_nothing_half_written(tmp_path):
    raw = make_raw_dataset(tmp_path / "raw", dataset_id=991, n_train=4, n_test=0, shape=(24, 24, 24), bad_label=True)
    with pytest.raises(AmalgamError, match=r"planning/preprocessing of .*Dataset991_TinyBlobs failed"):
        train_expert(raw, configuration=CONFIG, workspace_dir=tmp_path / "ws")
    ws = tmp_path / "ws"
    assert list((ws / "nnUNet_preprocessed").iterdir()) == [] and not (ws / "nnUNet_results").exists()
    assert (ws / "logs" / "nnunet" / f"Dataset991_TinyBlobs__{CONFIG}__preprocess.log").is_file()


def test_failed_training_leaves_no_results(trained):
    with pytest.raises(AmalgamError, match="nnU-Net training of Dataset990_TinyBlobs"):
        train_expert(trained["raw"], configuration=CONFIG, trainer="nnUNetTrainer_NoSuchTrainer", workspace_dir=trained["ws"])
    results = trained["ws"] / "nnUNet_results" / "Dataset990_TinyBlobs"
    assert sorted(p.name for p in results.iterdir()) == [trained["model"].name]
    assert not [p for p in results.parent.iterdir() if p.name.startswith(".")]


def test_bad_arguments():
    with pytest.raises(AmalgamError, match="fold: expected a non-negative integer"): train_expert("x", fold=-1)
    with pytest.raises(AmalgamError, match="nnU-Net raw dataset folder must be named"): train_expert(Path(__file__).parent)


def test_saving_a_fold_keeps_the_other_folds(tmp_path):
    expert = tiny_test_expert(spatial_dims=2, num_classes=3, name="toy")
    save_model_folder(expert, tmp_path / "model", fold=0)
    save_model_folder(expert, tmp_path / "model", fold=1)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["dataset.json", "fold_0", "fold_1", "plans.json"]
    loaded = Expert.from_folder(tmp_path / "model", fold=0)
    assert [s.channels for s in loaded.feature_specs] == [s.channels for s in expert.feature_specs]


def _nnunet_normalize(expert, x: torch.Tensor) -> torch.Tensor:
    "nnU-Net's own normalisation classes and nonzero mask, sample by sample, in NumPy (what its DefaultPreprocessor does)."
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
    out = x.numpy().copy()
    for b in range(len(out)):
        seg = np.where(create_nonzero_mask(out[b]), 0, -1).astype(np.int8)
        for c, norm in enumerate(expert._normalizers): out[b, c] = norm.run(out[b, c], seg)
    return torch.from_numpy(out)


@pytest.mark.parametrize("scheme", ["ct", "zscore", "masked_zscore"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torch_normalization_equals_nnunet(scheme, spatial_dims):
    expert = tiny_test_expert(spatial_dims, in_channels=2, modality="CT" if scheme == "ct" else "MR")
    if scheme == "masked_zscore":
        for n in expert._normalizers: n.use_mask_for_norm = True
    g = torch.Generator().manual_seed(spatial_dims)
    shape = (3, 2, 20, 24) if spatial_dims == 2 else (2, 2, 10, 12, 14)
    x = torch.randn(*shape, generator=g) * 400 + 30
    x[:, :, :3] = 0  # a zero border outside the body; and an interior hole that nnU-Net's mask fills
    x[:, :, 6:8, 5:7] = 0
    x[0, 1, 4, 4] = 0  # zero in one channel only: still inside the mask
    assert torch.allclose(expert.normalize(x), _nnunet_normalize(expert, x), rtol=1e-5, atol=1e-5)
    if scheme == "ct": assert expert.normalize(x).abs().max() <= 4.0 + 1e-5  # clipped to the percentiles: (300-100)/50
    if scheme == "masked_zscore": assert torch.equal(expert.normalize(x)[:, :, :3], x[:, :, :3])


def test_unported_scheme_falls_back_to_nnunet():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import RescaleTo01Normalization
    expert = tiny_test_expert(2, in_channels=1, modality="MR")
    expert._normalizers = [RescaleTo01Normalization(use_mask_for_norm=False, intensityproperties={})]
    x = torch.rand(2, 1, 16, 16) * 50 - 10
    y = expert.normalize(x)
    assert torch.allclose(y.amin((1, 2, 3)), torch.zeros(2)) and torch.allclose(y.amax((1, 2, 3)), torch.ones(2))
    assert torch.allclose(y, _nnunet_normalize(expert, x))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encode_gives_features_and_the_same_logits_in_one_pass(spatial_dims):
    expert = tiny_test_expert(spatial_dims, num_classes=4, seed=3)
    x = torch.randn(2, 1, *[32] * spatial_dims) * 200 + 50
    feats, logits = expert.encode(x, logits=True)
    assert torch.equal(logits, expert.predict(x))
    assert all(torch.equal(a, b) for a, b in zip(feats, expert.features(x), strict=True))
    assert logits.shape == (2, 4, *[32] * spatial_dims) and logits.dtype == torch.float32
    assert not any(f.requires_grad or f.is_inference() for f in feats)
    with torch.no_grad(): ref = expert.network(expert.normalize(x))  # nnU-Net's network end to end
    assert torch.equal(logits, ref)
    _, part = expert.encode(x, logits=[1, 0])  # the decoder on chosen elements, in the order asked
    assert part.shape == logits.shape and torch.allclose(part, logits[[1, 0]], atol=1e-5)
    with pytest.raises(AmalgamError, match=r"encode\(logits=True\) needs spatial sizes divisible"):
        expert.encode(torch.randn(1, 1, *[34] * spatial_dims), logits=True)
    assert len(expert.encode(torch.randn(1, 1, *[34] * spatial_dims))) == 3  # features alone need no divisibility


def test_bank_encode_and_amp_flag():
    bank = ExpertBank([tiny_test_expert(2, name="a"), tiny_test_expert(2, name="b", num_classes=2, seed=1)])
    x = torch.randn(2, 1, 32, 32) * 100
    feats, logits = bank.encode(x, logits=True)
    assert sorted(feats) == sorted(logits) == ["a", "b"] and logits["b"].shape == (2, 2, 32, 32)
    assert all(torch.equal(u, v) for u, v in zip(feats["a"], bank.features(x)["a"]))
    e = bank["a"]
    assert e.amp == "auto" and not e._autocast()._enabled  # auto: off on the CPU
    e.amp = "bf16"  # forced: autocast on the CPU too, features in bf16, logits still float32 and close
    f16, l16 = e.encode(x, logits=True)
    assert f16[0].dtype == torch.bfloat16 and l16.dtype == torch.float32
    assert (l16 - logits["a"]).abs().max() < 0.1 * logits["a"].abs().max()
    with pytest.raises(AmalgamError, match="amp: expected"):
        Expert(e.network, e.plans, e.dataset_json, e.configuration, amp="fp8")


def _case_with_body(channels: int = 2, seed: int = 0) -> np.ndarray:
    "A whole MR-like case C x 12 x 34 x 30: zero border, an elliptic body with a bright block, zeros outside the body."
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(34), np.arange(30), indexing="ij")
    body = ((yy - 17) / 15) ** 2 + ((xx - 15) / 13) ** 2 <= 1
    vol = np.zeros((channels, 12, 34, 30), np.float32)
    for c in range(channels):
        vol[c][3:11, body] = 150 + 60 * c + g.normal(0, 25, (8, int(body.sum())))
        vol[c, 3:11, 14:26, 10:22] += 120
    return vol


def _shifted(cut, origin):
    "The spatial slices `cut` of a case moved into the frame of its nonzero crop starting at `origin`, all channels."
    return (slice(None), *(slice(s.start - o, s.stop - o) for s, o in zip(cut, origin)))


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_with_volume_stats_equals_nnunet_whole_case_normalization(spatial_dims, use_mask):
    """A patch cut from a case and normalised with stats=volume_stats(case) is that crop of nnU-Net's own normalisation
    of the whole case (crop_to_nonzero, then ZScoreNormalization.run per channel, as its DefaultPreprocessor), and not
    what the patch's own statistics give."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    expert = tiny_test_expert(spatial_dims, in_channels=2, modality="MR")
    for n in expert._normalizers: n.use_mask_for_norm = use_mask
    case = _case_with_body()
    data, seg, bbox = crop_to_nonzero(case.copy())
    norm = ZScoreNormalization(use_mask_for_norm=use_mask, intensityproperties={})
    whole = np.stack([norm.run(data[c].copy(), seg[0]) for c in range(2)])
    stats = expert.volume_stats(torch.from_numpy(case))
    assert stats.shape == (2, 2) and stats.dtype == torch.float32
    lo = [b[0] for b in bbox]
    if spatial_dims == 2:  # four slices of 16 x 16 reaching outside the body
        cut = (slice(None), slice(4, 8), slice(4, 20), slice(3, 19))
        patch = torch.from_numpy(case[cut]).permute(1, 0, 2, 3)
        theirs = torch.from_numpy(whole[_shifted(cut[1:], lo)]).permute(1, 0, 2, 3)
    else:  # two windows of 8 x 16 x 16
        cuts = [(slice(3, 11), slice(4, 20), slice(3, 19)), (slice(3, 11), slice(16, 32), slice(12, 28))]
        patch = torch.stack([torch.from_numpy(case[(slice(None), *c)]) for c in cuts])
        theirs = torch.stack([torch.from_numpy(whole[_shifted(c, lo)]) for c in cuts])
    rows = stats.expand(len(patch), 2, 2)
    ours = expert.normalize(patch, stats=rows)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
    assert (expert.normalize(patch) - theirs).abs().max() > 0.1
    assert (patch == 0).any()  # the patch reaches outside the body: there the mask rule shows
    if use_mask: assert torch.equal(ours[patch == 0], patch[patch == 0])
    else: assert (ours[patch == 0] != 0).all()
    # the same statistics reach the network through encode / features / predict and through a bank
    if spatial_dims == 2: patch = torch.nn.functional.pad(patch, (0, 16, 0, 16))
    feats, logits = expert.encode(patch, logits=True, stats=rows)
    normalized = expert.normalize(patch, stats=rows)
    assert torch.equal(feats[0], expert.features(normalized, normalized=True)[0])
    assert torch.equal(logits, expert.predict(patch, stats=rows))
    assert not torch.equal(logits, expert.predict(patch))
    bank = ExpertBank([expert])
    assert torch.equal(bank.volume_stats(case)[expert.name], stats)
    assert torch.equal(bank.encode(patch, stats={expert.name: rows})[expert.name][-1], feats[-1])


def test_volume_stats_of_ct_and_bad_stats():
    ct = tiny_test_expert(2, in_channels=1, modality="CT")
    case = _case_with_body(channels=1)
    stats = ct.volume_stats(case)
    assert torch.isfinite(stats).all()  # documented: CT ignores them, but the row is the case's z-score statistics
    x = torch.from_numpy(case[:, 4:6, :32, :28]).permute(1, 0, 2, 3)
    assert torch.equal(ct.normalize(x, stats=stats.expand(2, 1, 2)), ct.normalize(x))
    empty = np.zeros((1, 4, 8, 8), np.float32)
    assert torch.equal(tiny_test_expert(2, modality="MR").volume_stats(empty), torch.zeros(1, 2))
    with pytest.raises(AmalgamError, match=r"stats must be a tensor B x C x 2 = \(2, 1, 2\)"):
        ct.normalize(x, stats=stats)
    with pytest.raises(AmalgamError, match="non-finite"): ct.normalize(x, stats=torch.full((2, 1, 2), float("nan")))
    with pytest.raises(AmalgamError, match="volume_stats expects one whole case"): ct.volume_stats(case[0])
    with pytest.raises(AmalgamError, match="stats must name every expert"):
        ExpertBank([ct]).features(x, stats={"other": stats.expand(2, 1, 2)})


def test_segment_image_runs_in_the_experts_precision():
    "An expert scored alone by segment_image runs in its own amp, as it does inside KA²ER (bf16 there on an AMX CPU)."
    expert = tiny_test_expert(2, num_classes=3, seed=2)
    seen = []
    hook = expert.network.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    image = np.random.default_rng(0).normal(50, 100, (1, 6, 40, 36)).astype(np.float32)
    for amp in ("off", "bf16"):
        expert.amp = amp
        seen.clear()
        expert.segment_image(image, (2.0, 1.0, 1.0))
        assert seen and set(seen) == {torch.float32 if amp == "off" else torch.bfloat16}
    hook.remove()


def test_planning_workers_and_the_trainers_plans(tmp_path, monkeypatch):
    """nnUNetv2_plan_and_preprocess gets -np and -npfp from nnUNet_def_n_proc (its own defaults are 8 and 8); nnU-Net's
    trainer plans with nnU-Net's planner, amalgam's CPU trainers with amalgam's variant, planned by its planner after
    nnU-Net's fingerprint (no default preprocessing)."""
    import amalgam.experts as ex
    calls = []
    monkeypatch.setattr(ex, "_run_nnunet", lambda args, env, log, what: calls.append([str(a) for a in args]))
    raw = make_raw_dataset(tmp_path / "raw", dataset_id=992, n_train=2, n_test=0, shape=(24, 24, 24))
    for n_proc, expected in ((None, "2"), ("3", "3")):
        if n_proc is None: monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
        else: monkeypatch.setenv("nnUNet_def_n_proc", n_proc)
        with pytest.raises(AmalgamError, match="no configuration '2d' in plans 'nnUNetPlans'"):
            train_expert(raw, trainer=FULL_TRAINER, workspace_dir=tmp_path / "ws")  # nothing was really preprocessed
        args = calls[-1]
        assert args[args.index("-np") + 1] == expected and args[args.index("-npfp") + 1] == expected
        assert "--no_pp" not in args
    calls.clear()
    with pytest.raises(AmalgamError, match=f"no configuration '2d' in plans '{CPU_PLANS}'"):
        train_expert(raw, trainer=CPU_TRAINER, workspace_dir=tmp_path / "ws")
    assert "--no_pp" in calls[0]
    assert calls[1][0] == "-c" and f"plan_variant(992, '{CPU_PLANS}', '2d', 3)" in calls[1][1]


@pytest.mark.slow
def test_manifest_split_is_nnunet_fold_0_and_cpu_plans(tmp_path):
    """Given a manifest, nnU-Net's fold 0 is the manifest's split (train: its train cases, val: its val cases, named as
    nnU-Net names the preprocessed cases); a differing splits file is replaced, other files are left alone. The CPU
    plans variant is nnU-Net's plan with half the features per stage, preprocessed by nnU-Net under its own name."""
    from amalgam.manifests import load_manifest, write_manifest
    from amalgam.phantoms import phantom_manifest
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    mapping = phantom_manifest("mr_cardiac", n_cases=6, shape=(32, 32, 24), root=tmp_path / "src")
    manifest = load_manifest(write_manifest(mapping, tmp_path / "mr_cardiac.yaml"))
    assert all(manifest.split[s] for s in ("train", "val", "test"))
    ws = tmp_path / "ws"
    no_trainer = "nnUNetTrainer_NoSuchTrainer"  # stops right after planning, preprocessing and writing the split
    with pytest.raises(AmalgamError, match="nnU-Net training of"):
        train_expert(manifest, trainer=no_trainer, workspace_dir=ws, plans=CPU_PLANS)
    pre = ws / "nnUNet_preprocessed" / manifest.dataset_folder_name
    default, cpu = (json.loads((pre / f"{p}.json").read_text())["configurations"]["2d"]
                    for p in ("nnUNetPlans", CPU_PLANS))
    assert cpu["architecture"]["arch_kwargs"]["features_per_stage"] == [
        f // 2 for f in default["architecture"]["arch_kwargs"]["features_per_stage"]]
    assert (cpu["patch_size"], cpu["spacing"], cpu["normalization_schemes"]) == (
        default["patch_size"], default["spacing"], default["normalization_schemes"])
    assert not (pre / "nnUNetPlans_2d").exists()  # only the variant was preprocessed
    expected = [{"train": manifest.split["train"], "val": manifest.split["val"]}]
    assert json.loads((pre / "splits_final.json").read_text()) == expected
    data = pre / f"{CPU_PLANS}_2d"
    identifiers = set(infer_dataset_class(str(data)).get_identifiers(str(data)))
    assert identifiers == set(manifest.split["train"]) | set(manifest.split["val"])  # test cases are not nnU-Net's
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["x"], "val": ["y"]}] * 5))
    (pre / "notes.txt").write_text("mine")
    with pytest.raises(AmalgamError, match="nnU-Net training of"):
        train_expert(tmp_path / "mr_cardiac.yaml", trainer=no_trainer, workspace_dir=ws, plans=CPU_PLANS)
    assert json.loads((pre / "splits_final.json").read_text()) == expected
    assert (pre / "notes.txt").read_text() == "mine"
