"""amalgam.segmenter and amalgam.evaluation Python API: run folders, sliding-window prompt shifting (3D), slice-wise inference (2D), automatic mode,
expert weights, coordinates and the evaluation protocol. Tiny random-init models: the checks are about geometry and
bookkeeping, compared against direct model calls on the same windows."""
import numpy as np
import pytest
import torch

from amalgam.config import AmalgamError, write_json
from amalgam.data import DataConfig, box_from_mask, center_click, tensor_affine
from amalgam.evaluation import EVAL_MODES, prompted_segmentation
from amalgam.experts import ExpertBank, save_model_folder
from amalgam.losses import LossConfig
from amalgam.model import KA2ERConfig, build_model
from amalgam.prompts import Prompts
from amalgam.run import best_mask, multimask_for
from amalgam.segmenter import Segmenter, voxel_to_world, world_to_voxel
from amalgam.train import TrainConfig
from tiny_experts import tiny_test_expert

TINY = dict(feature_size=12, hidden_dim=24, num_heads=2, transformer_dim=32, decoder_heads=2, iou_head_hidden_dim=32, mask_in_chans=8)
TASKS = {"demo": ["ball", "cube"]}


def make_run(run_dir, spatial_dims=3, patch_size=(32, 32, 64), pixdim=None, seed=0, checkpoint=True,
             loss=LossConfig(compete_weight=1.0), **model):
    """A run folder as amalgam.train writes it (config.json, model.pt), without training: a random-init model around one
    saved tiny expert, recorded as trained with `loss` (by default with its classes competing); `model`: more
    `KA2ERConfig` fields."""
    expert = tiny_test_expert(spatial_dims, 1, 3, name="demo", seed=seed)
    folder = save_model_folder(expert, run_dir.parent / f"{run_dir.name}_expert" / "Dataset001_Demo" / f"nnUNetTrainer__nnUNetPlans__{expert.configuration}")
    config = KA2ERConfig(spatial_dims=spatial_dims, tasks=TASKS, seed=seed, **TINY, **model)
    model = build_model(config, ExpertBank([expert]))
    with torch.no_grad():  # decoder outputs of a fresh init are near 0.5 everywhere; spread them so masks are not all-or-nothing
        for p in model.decoder.output_hypernetworks_mlps.parameters(): p.mul_(4)
    data = DataConfig(spatial_dims=spatial_dims, patch_size=patch_size, pixdim=pixdim)
    write_json(run_dir / "config.json", {
        "model": config.to_dict(), "data": data.to_dict(), "train": TrainConfig().to_dict(), "loss": loss.to_dict(),
        "experts": [{"name": "demo", "task": "demo", "folder": str(folder), "fold": 0, "labels": dict(expert.labels)}], "manifests": []})
    if checkpoint: torch.save({"model": model.state_dict(), "step": 0}, run_dir / "model.pt")
    return run_dir


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory):
    return Segmenter.from_run(make_run(tmp_path_factory.mktemp("r3") / "run"), overlap=0.0)


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory):
    return Segmenter.from_run(make_run(tmp_path_factory.mktemp("r2") / "run", 2, (64, 64)))


def image(shape, seed=0):
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)) * 50 + 100


def direct(seg, x, prompts):
    "Probability of the model on exactly one window `C x *window`, decoded as training does."
    with torch.no_grad():
        out = seg.model(x[None], prompts, multimask_output=multimask_for(prompts))
    return torch.sigmoid(best_mask(out.masks, out.iou))[0, 0].numpy()


def test_from_run_loads_the_saved_weights(tmp_path, seg3d):
    run = make_run(tmp_path / "run")
    seg = Segmenter.from_run(run)
    assert seg.tasks == TASKS and seg.spatial_dims == 3 and seg.patch_size == (32, 32, 64)
    assert seg.weight_names == ("demo", "foundation")
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    for k, v in seg.model.state_dict().items(): assert torch.equal(v, state[k]), k
    (run / "model.pt").unlink()
    with pytest.raises(AmalgamError, match="model.pt"): Segmenter.from_run(run)
    with pytest.raises(AmalgamError, match="config.json"): Segmenter.from_run(tmp_path / "nowhere")


def test_3d_prompts_are_shifted_into_their_window(seg3d):
    "Two non-overlapping windows along the first axis: a box in the far window and a click in the near one give exactly the direct model outputs on those windows."
    x = image((64, 32, 64))
    box = np.array([[40, 4, 10], [60, 25, 50]], float)
    click = np.array([[10, 16, 30]], float)
    res = seg3d.segment(x, points=click, box=box, return_probability=True)
    far = direct(seg3d, x[:, 32:], Prompts(boxes=torch.tensor(box - [32, 0, 0], dtype=torch.float32)[None]))
    near = direct(seg3d, x[:, :32], Prompts(points=torch.tensor(click, dtype=torch.float32)[None], point_labels=torch.ones(1, 1, dtype=torch.long)))
    np.testing.assert_allclose(res.probability[32:], far, atol=1e-5)
    np.testing.assert_allclose(res.probability[:32], near, atol=1e-5)
    np.testing.assert_array_equal(res.mask, (res.probability > 0.5).astype(np.uint8))
    assert 0 < res.mask.sum() < res.mask.size
    # a box reaching into the near window is clipped to it; a window without any prompt is background
    only_far = seg3d.segment(x, box=[[35, 0, 0], [63, 31, 63]], return_probability=True)
    assert only_far.probability[:32].max() == 0 and only_far.probability[32:].max() > 0
    # a task given with the box conditions the box's window only: the window without the box does not run; the task
    # alone (automatic mode) runs both
    tagged = seg3d.segment(x, box=[[35, 0, 0], [63, 31, 63]], task="demo:ball", return_probability=True)
    cls = Prompts(boxes=torch.tensor([[3.0, 0, 0], [31, 31, 63]])[None],
                  classes=torch.tensor([seg3d.model.class_index("demo:ball")]))
    np.testing.assert_allclose(tagged.probability[32:], direct(seg3d, x[:, 32:], cls), atol=1e-5)
    assert tagged.probability[:32].max() == 0
    assert seg3d.segment(x, task="demo:ball", return_probability=True).probability[:32].max() > 0


def test_3d_image_smaller_than_the_window_and_overlapping_windows(seg3d):
    x = image((20, 40, 50), seed=1)
    res = seg3d.segment(x, box=[[2, 3, 4], [15, 30, 40]], return_probability=True)
    assert res.mask.shape == (20, 40, 50) and res.probability.dtype == np.float32 and res.probability.max() > 0
    seg = Segmenter(seg3d.model, seg3d.data_config, overlap=0.5)  # Gaussian blending of overlapping windows
    big = seg.segment(image((48, 32, 64), seed=2), box=[[5, 5, 5], [40, 30, 60]], return_probability=True)
    assert big.probability.shape == (48, 32, 64) and 0 <= big.probability.min() and big.probability.max() <= 1

def test_automatic_mode_and_expert_weights(seg3d):
    x = image((32, 32, 64), seed=3)
    res = seg3d.segment(x, task="demo:cube", return_probability=True, return_weights=True)
    cls = Prompts(classes=torch.tensor([seg3d.model.class_index("demo:cube")]))
    # the task's two classes run as one batch of windows (they compete, see the next test): float summation order only
    np.testing.assert_allclose(res.probability, direct(seg3d, x, cls), atol=1e-4)
    assert sorted(res.expert_weights) == ["demo", "foundation"]
    total = res.expert_weights["demo"] + res.expert_weights["foundation"]
    np.testing.assert_allclose(total, 1, atol=1e-4)
    assert res.expert_weights["demo"].shape == (32, 32, 64)
    # weights are prompt-independent and cover windows without a prompt too
    far = seg3d.segment(image((64, 32, 64), seed=3), box=[[40, 4, 10], [60, 25, 50]], return_weights=True)
    np.testing.assert_allclose(far.expert_weights["demo"][:32] + far.expert_weights["foundation"][:32], 1, atol=1e-4)


def test_automatic_mode_classes_compete(seg3d, seg2d):
    """Automatic mode for one class answers as the task's label map does (and as an nnU-Net expert's softmax): a voxel
    two classes both claim goes to the more probable one. `exclusive=False` keeps each class's own probability > 0.5, and a
    task given with a box is not a competition."""
    for seg, x in ((seg3d, image((32, 32, 64), seed=4)), (seg2d, image((3, 64, 64), seed=4))):
        task = seg.segment_task(x, "demo")
        alone = Segmenter(seg.model, seg.data_config, overlap=seg.overlap, exclusive=False)
        both = np.ones(x.shape[1:], bool)
        for k, c in enumerate(task.classes):
            res = seg.segment(x, task=f"demo:{c}", return_probability=True)
            np.testing.assert_array_equal(res.mask, task.labels == task.values[k])
            np.testing.assert_allclose(res.probability, task.probabilities[k], atol=1e-6)
            own = alone.segment(x, task=f"demo:{c}", return_probability=True)
            np.testing.assert_allclose(own.probability, res.probability, atol=1e-4)
            np.testing.assert_array_equal(own.mask, own.probability > 0.5)
            both &= own.mask.astype(bool)
        assert both.any() and (task.labels[both] > 0).all()  # the own masks overlap, and the label map settles it
        boxed = seg.segment(x, box=[[0, 2, 3], [1, 30, 40]], task="demo:ball", return_probability=True)
        np.testing.assert_array_equal(boxed.mask, boxed.probability > 0.5)


def test_automatic_mode_answers_by_the_rule_the_run_was_trained_with(tmp_path):
    """A run trained with its classes competing answers automatic mode by the competition; one trained a class at a time
    answers each class alone; an explicit `exclusive` wins."""
    x = image((2, 64, 64), seed=4)
    alone_run = make_run(tmp_path / "alone", 2, (64, 64), loss=LossConfig())
    seg = Segmenter.from_run(alone_run)
    assert not seg.exclusive and Segmenter.from_run(make_run(tmp_path / "compete", 2, (64, 64))).exclusive
    competing = Segmenter.from_run(alone_run, exclusive=True)
    task, own = competing.segment_task(x, "demo"), seg.segment(x, task="demo:ball", return_probability=True)
    rival = competing.segment(x, task="demo:ball").mask
    np.testing.assert_array_equal(own.mask, own.probability > 0.5)
    np.testing.assert_array_equal(rival, task.labels == task.values[0])
    assert (own.mask != rival).any()  # the two rules differ on this model


def test_decoder_taps_reach_the_segmenter(tmp_path):
    "A run amalgamating the experts' decoder stages is segmented with them: the Segmenter equals the model's forward."
    run = make_run(tmp_path / "run", 2, (64, 64), expert_taps="decoder", expert_residual=True, scales=[1, 2, 8],
                   zero_init_expert_path=False)  # a random expert path, so which taps are read shows in the output
    seg = Segmenter.from_run(run)
    assert seg.model.expert_taps == "decoder" and seg.model.amalgamation.blocks["1"].expert_residual
    x = image((2, 64, 64), seed=6)
    res = seg.segment(x, task="demo:ball", return_probability=True)
    cls = Prompts(classes=torch.tensor([seg.model.class_index("demo:ball")]))
    for z in range(2): np.testing.assert_allclose(res.probability[z], direct(seg, x[:, z], cls), atol=1e-4)
    seg.model.expert_taps = "encoder"  # the same weights reading the encoder stages give another answer
    assert not np.allclose(direct(seg, x[:, 0], cls), res.probability[0], atol=1e-3)


def test_2d_model_segments_slice_by_slice(seg2d):
    x = image((4, 64, 64), seed=4)
    box3 = np.array([[1, 10, 12], [2, 40, 50]], float)
    res = seg2d.segment(x, box=box3, return_probability=True)
    assert res.probability[[0, 3]].max() == 0
    for z in (1, 2):
        ref = direct(seg2d, x[:, z], Prompts(boxes=torch.tensor(box3[:, 1:], dtype=torch.float32)[None]))
        np.testing.assert_allclose(res.probability[z], ref, atol=1e-5)
    per_slice = seg2d.segment_slices(x, boxes={1: box3[:, 1:], 2: box3[:, 1:]}, return_probability=True)
    np.testing.assert_allclose(per_slice.probability, res.probability, atol=1e-6)
    # a click acts on its own (nearest) slice only
    pts = seg2d.segment(x, points=[[2.2, 30, 30]], return_probability=True)
    assert pts.probability[[0, 1, 3]].max() == 0 and pts.probability[2].max() > 0
    # slices larger than the window: 2D sliding window per slice, automatic mode on every slice
    big = seg2d.segment(image((2, 100, 70), seed=5), task="demo:ball", return_probability=True, return_weights=True)
    assert big.mask.shape == (2, 100, 70) and (big.probability.reshape(2, -1).max(1) > 0).all()
    np.testing.assert_allclose(big.expert_weights["demo"] + big.expert_weights["foundation"], 1, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(points=[[5, 5, 70]]), "outside the image"),
    (dict(points=[[-1, 5, 5]]), "outside the image"),
    (dict(box=[[10, 5, 5], [2, 9, 9]]), "flipped"),
    (dict(box=[[0, 0, 0], [5, 5, 99]]), "outside the image"),
    (dict(task="liver"), "not in the class vocabulary"),
    (dict(task="demo"), "ambiguous"),
    (dict(points=[[1, 1, 1]], point_labels=[2]), "point_labels"),
    (dict(), "no prompt"),
])
def test_bad_prompts(seg3d, kwargs, message):
    with pytest.raises(AmalgamError, match=message): seg3d.segment(image((32, 32, 64)), **kwargs)


def test_bad_images(seg3d, seg2d):
    x = image((32, 32, 64))
    x[0, 3, 3, 3] = float("nan")
    with pytest.raises(AmalgamError, match="NaN"): seg3d.segment(x, task="demo:ball")
    with pytest.raises(AmalgamError, match="3 spatial axes"): seg3d.segment(torch.zeros(1, 32, 64), task="demo:ball")
    with pytest.raises(AmalgamError, match="channel"): seg3d.segment(torch.zeros(2, 32, 32, 64), task="demo:ball")
    with pytest.raises(AmalgamError, match="3D model"): seg3d.segment_slices(image((32, 32, 64)), boxes={0: [[0, 0], [3, 3]]})
    with pytest.raises(AmalgamError, match="slice 1"): seg2d.segment_slices(image((2, 64, 64)), boxes={1: [[0, 9], [3, 3]]})


def test_world_and_voxel_coordinates(seg3d):
    rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.diag([0.8, 1.5, 2.5])
    affine = np.eye(4); affine[:3, :3], affine[:3, 3] = rot, [-30, 12, 7]
    vox = np.array([[0, 0, 0], [10.5, 3, 4], [31, 31, 63]])
    mm = voxel_to_world(vox, affine)
    np.testing.assert_allclose(world_to_voxel(mm, affine), vox, atol=1e-9)
    np.testing.assert_allclose(mm[1] - mm[0], rot @ vox[1])
    x = image((32, 32, 64), seed=6)
    a = seg3d.segment(x, points=vox[1:2], box=vox[[0, 2]] * [0.5, 0.5, 0.5] + [1, 1, 1]).mask
    b = seg3d.segment(x, points=world_to_voxel(voxel_to_world(vox[1:2], affine), affine), box=vox[[0, 2]] * 0.5 + 1).mask
    np.testing.assert_array_equal(a, b)
    nib_affine = np.diag([2.0, 3.0, 4.0, 1.0])
    np.testing.assert_allclose(voxel_to_world([[1, 1, 1]], tensor_affine(nib_affine)), [[2, 3, 4]])
    np.testing.assert_allclose(voxel_to_world([[1, 0, 0]], tensor_affine(nib_affine)), [[0, 0, 4]])  # tensor axis 0 = the file's z


def _spy(seg, name):
    calls = []
    original = getattr(seg, name)
    def wrapped(*a, **k):
        calls.append(k); return original(*a, **k)
    setattr(seg, name, wrapped)
    return calls


def test_evaluation_protocol_3d(seg3d):
    x, gt = image((32, 32, 64), seed=7), np.zeros((32, 32, 64), bool)
    gt[8:20, 10:25, 20:50] = True
    calls = _spy(seg3d, "segment")
    try:
        masks = {m: prompted_segmentation(seg3d, x, gt, m, "demo:ball") for m in EVAL_MODES}
    finally: del seg3d.segment
    for m in masks.values(): assert m.shape == gt.shape and m.dtype == np.uint8
    np.testing.assert_array_equal(calls[0]["task"], "demo:ball")
    np.testing.assert_array_equal(calls[1]["box"], box_from_mask(torch.from_numpy(gt), 0.0, None).numpy())
    np.testing.assert_array_equal(calls[2]["points"], center_click(torch.from_numpy(gt)).numpy()[None])
    clicks = [c for c in calls[3:] if "points" in c]
    assert calls[-1]["task"] == "demo:ball" and "points" not in calls[-1]  # auto_alone: the class alone again
    assert 1 <= len(clicks) <= 3 and len(clicks[-1]["points"]) == len(clicks)  # one click, then one corrective click per round
    np.testing.assert_array_equal(clicks[0]["points"], calls[2]["points"])
    np.testing.assert_array_equal(prompted_segmentation(seg3d, x, np.zeros_like(gt), "box", "demo:ball"), np.zeros_like(gt, np.uint8))
    with pytest.raises(AmalgamError, match="mode"): prompted_segmentation(seg3d, x, gt, "click2", "demo:ball")
    with pytest.raises(AmalgamError, match="not in the class vocabulary"): prompted_segmentation(seg3d, x, gt, "box", "liver:liver")


def test_evaluation_protocol_2d_uses_per_slice_prompts(seg2d):
    x, gt = image((5, 64, 64), seed=8), np.zeros((5, 64, 64), bool)
    gt[1, 10:20, 10:30] = True; gt[3, 30:50, 20:25] = True
    calls = _spy(seg2d, "segment_slices")
    try:
        box = prompted_segmentation(seg2d, x, gt, "box", "demo:ball")
        click3 = prompted_segmentation(seg2d, x, gt, "click3", "demo:ball")
    finally: del seg2d.segment_slices
    assert sorted(calls[0]["boxes"]) == [1, 3]
    np.testing.assert_array_equal(calls[0]["boxes"][3], [[30, 20], [49, 24]])  # tight 2D box of that slice
    assert sorted(calls[1]["points"]) == [1, 3] and all(len(p[0]) == 1 for p in calls[1]["points"].values())
    last = [len(p[0]) for p in calls[-1]["points"].values()]
    assert max(last) <= len(calls) - 1 and sum(last) >= 2 + (len(calls) - 2)  # each further round added at least one corrective click
    assert box[[0, 2, 4]].max() == 0 and click3[[0, 2, 4]].max() == 0  # slices without the structure get no prompt


def test_baseline_model_has_no_expert_weights(seg2d):
    config = KA2ERConfig(spatial_dims=2, tasks=TASKS, **TINY)
    seg = Segmenter(build_model(config, None), seg2d.data_config)
    assert seg.weight_names == ()
    assert seg.segment(image((1, 64, 64)), task="demo:ball").mask.shape == (1, 64, 64)
    assert seg.segment(image((1, 64, 64)), task="demo:ball", return_weights=True).expert_weights is None
    with pytest.raises(AmalgamError, match="overlap"): Segmenter(seg.model, seg2d.data_config, overlap=1.0)
    with pytest.raises(AmalgamError, match="2D model with data config spatial_dims=3"):
        Segmenter(seg.model, DataConfig(spatial_dims=3, patch_size=(32, 32, 64)))


def test_window_encodings_are_cached_and_change_nothing(seg2d, tmp_path):
    "One encoding per window serves every prompt: same masks and weights as without the cache, and no re-encoding on a second prompt."
    x, gt = image((4, 64, 64), seed=3), np.zeros((4, 64, 64), bool)
    gt[1:3, 20:40, 15:35] = True
    uncached = Segmenter(seg2d.model, seg2d.data_config, cache_mb=0)
    seg2d._cache = type(seg2d._cache)(2**28)
    for mode in ("auto", "box", "click3"):
        np.testing.assert_array_equal(prompted_segmentation(seg2d, x, gt, mode, "demo:ball"), prompted_segmentation(uncached, x, gt, mode, "demo:ball"))
    # task routing: the class prompt biases the expert weighting, so a window is encoded once per class asked of it: the four
    # slices once per class of the task for automatic mode (its classes compete), and the two prompted slices once more
    # without a class for the box and all the clicks
    assert len(seg2d._cache) == 10 and len(uncached._cache) == 0
    calls = []
    encode = seg2d.model.foundation.forward
    seg2d.model.foundation.forward = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try: seg2d.segment(x, task="demo:ball", return_weights=True)
    finally: del seg2d.model.foundation.forward
    assert calls == []
    a = seg2d.segment(x, task="demo:ball", return_weights=True, return_probability=True)
    b = uncached.segment(x, task="demo:ball", return_weights=True, return_probability=True)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
    for n in a.expert_weights: np.testing.assert_allclose(a.expert_weights[n], b.expert_weights[n], atol=1e-6)
