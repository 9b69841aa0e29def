"KA2ER losses (amalgam.losses): hand-checked numerics, 2D/3D, bf16 autocast, SAM multimask selection and where gradients flow."
import math

import pytest
import torch
import torch.nn.functional as F

from amalgam.config import AmalgamError
from amalgam.losses import KA2ERLoss, LossConfig, distillation_loss, iou_targets, segmentation_loss, teacher_probability
from tiny_experts import tiny_test_expert

SHAPE = {2: (12, 10), 3: (6, 8, 10)}


def box_target(spatial_dims, b=2):
    t = torch.zeros(b, 1, *SHAPE[spatial_dims])
    t[(slice(None), slice(None), *[slice(2, 5)] * spatial_dims)] = 1
    return t


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config

def test_config_round_trip_and_errors():
    c = LossConfig(dice_weight=2, kd_temperature=4)
    assert LossConfig.from_dict(c.to_dict()) == c and isinstance(c.dice_weight, float)
    with pytest.raises(AmalgamError, match="did you mean 'iou_weight'"): LossConfig.from_dict({"iou_weigth": 1})
    with pytest.raises(AmalgamError, match="ce_weight: expected a number >= 0"): LossConfig(ce_weight=-0.1)
    with pytest.raises(AmalgamError, match="kd_weight: expected a number >= 0"): LossConfig(kd_weight=float("nan"))
    with pytest.raises(AmalgamError, match="kd_temperature: expected a number > 0"): LossConfig(kd_temperature=-1)
    with pytest.raises(AmalgamError, match="expected a number"): LossConfig(iou_weight="1")
    with pytest.raises(AmalgamError, match="expected a number"): LossConfig(iou_weight=True)


# ---------------------------------------------------------------- segmentation loss

@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_segmentation_loss_matches_formula(spatial_dims):
    t = box_target(spatial_dims)
    z = rand(*t.shape)
    p = torch.sigmoid(z).flatten(1)
    tf = t.flatten(1)
    dice = 1 - (2 * (p * tf).sum(1) + 1) / (p.sum(1) + tf.sum(1) + 1)   # smoothing 1 (DETR / SAM Dice)
    bce = -(tf * F.logsigmoid(z.flatten(1)) + (1 - tf) * F.logsigmoid(-z.flatten(1))).mean(1)
    torch.testing.assert_close(segmentation_loss(z, t), dice + bce)
    torch.testing.assert_close(segmentation_loss(z, t, dice_weight=0.3, ce_weight=2.0), 0.3 * dice + 2.0 * bce)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_perfect_logits_give_zero_and_empty_target_still_trains(spatial_dims):
    t = box_target(spatial_dims)
    assert segmentation_loss((2 * t - 1) * 40, t).abs().max() < 1e-6
    empty = torch.zeros_like(t)
    assert segmentation_loss(torch.full_like(t, -40.0), empty).abs().max() < 1e-6
    z = torch.zeros_like(t, requires_grad=True)   # p = 0.5 everywhere on an empty target
    loss = segmentation_loss(z, empty, ce_weight=0)
    assert (loss > 0.9).all()   # the Dice term is not flat: false positives are penalised
    loss.sum().backward()
    assert (z.grad > 0).all()


def test_segmentation_loss_is_float32_under_bf16_autocast():
    t = box_target(3)
    z = rand(*t.shape)
    ref = segmentation_loss(z, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = segmentation_loss(z.bfloat16(), t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)   # only the bf16 rounding of the inputs differs


def test_shape_errors_name_the_argument():
    t = box_target(2)
    with pytest.raises(AmalgamError, match="target: expected shape"): segmentation_loss(rand(2, 1, 12, 11), t)
    with pytest.raises(AmalgamError, match="logits: expected B x M"): segmentation_loss(rand(12, 10), t)
    with pytest.raises(AmalgamError, match="logits: expected one channel"): segmentation_loss(rand(2, 3, 12, 10), t)


# ---------------------------------------------------------------- distillation

def test_teacher_probability_is_the_softened_class_channel():
    logits = rand(3, 4, 5, 6)
    p = teacher_probability(logits, [1, 3, 2], temperature=3.0)
    assert p.shape == (3, 1, 5, 6) and p.dtype == torch.float32 and not p.requires_grad
    for b, c in enumerate([1, 3, 2]):
        torch.testing.assert_close(p[b, 0], torch.softmax(logits[b] / 3.0, 0)[c])
    # a higher temperature pulls the probabilities towards uniform (1 / K)
    sharp, soft = teacher_probability(logits, [1, 1, 1], 0.5), teacher_probability(logits, [1, 1, 1], 10.0)
    assert (soft - 0.25).abs().mean() < (sharp - 0.25).abs().mean()
    with pytest.raises(AmalgamError, match="channels: expected 3 values"): teacher_probability(logits, [1, 2], 1.0)
    with pytest.raises(AmalgamError, match=r"channels: \[4\] not a foreground channel"): teacher_probability(logits, [1, 4, 2], 1.0)
    with pytest.raises(AmalgamError, match="temperature: must be > 0"): teacher_probability(logits, [1, 1, 1], 0.0)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_is_zero_at_agreement_and_matches_direct_kl(T):
    z = rand(2, 1, *SHAPE[3])
    torch.testing.assert_close(distillation_loss(z, torch.sigmoid(z / T), T), torch.zeros(2), atol=1e-6, rtol=0)
    p = torch.rand(2, 1, *SHAPE[3], generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    q = torch.sigmoid(z.double() / T)
    pd = p.double()
    kl = pd * torch.log(pd / q) + (1 - pd) * torch.log((1 - pd) / (1 - q))
    torch.testing.assert_close(distillation_loss(z, p, T), (T**2 * kl.flatten(1).mean(1)).float(), atol=1e-5, rtol=1e-5)


def test_kd_gradient_is_T_times_q_minus_p_and_saturated_values_stay_finite():
    T = 2.0
    z = rand(1, 1, 4, 4).requires_grad_(True)
    p = torch.tensor([0.0, 1.0, 0.3, 0.7]).repeat(4).view(1, 1, 4, 4)   # hard teacher labels included
    loss = distillation_loss(z, p, T)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    torch.testing.assert_close(z.grad, T * (torch.sigmoid(z.detach() / T) - p) / 16)
    extreme = torch.tensor([[-200.0, 200.0], [200.0, -200.0]]).view(1, 1, 2, 2)
    assert torch.isfinite(distillation_loss(extreme, torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2), T)).all()


def test_kd_from_a_real_expert_under_bf16_autocast():
    expert = tiny_test_expert(2, 1, 3, name="abdomen")
    x = 100 * rand(2, 1, 32, 32)
    with torch.no_grad(): logits = expert.predict(x)
    p = teacher_probability(logits, [1, 2], temperature=2.0)
    z = torch.logit(p.clamp(1e-6, 1 - 1e-6)) * 2.0   # a student that says exactly what the teacher says at T
    torch.testing.assert_close(distillation_loss(z, p, 2.0), torch.zeros(2), atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(rand(2, 1, 32, 32).bfloat16(), p, 2.0)
    assert out.dtype == torch.float32 and (out > 0).all()


# ---------------------------------------------------------------- IoU targets

def test_iou_targets_hand_made():
    t = torch.zeros(1, 1, 2, 4, 4); t[0, 0, :, :2, :2] = 1                # 8 voxels
    m = torch.full((1, 4, 2, 4, 4), -1.0)
    m[0, 0, :, :2, :2] = 1                                                 # equal: 1
    m[0, 1, :, :2, :] = 1                                                  # 8 of 16: 0.5
    m[0, 2, 0, :2, :2] = 1                                                 # 4 of 8: 0.5
    out = iou_targets(m.requires_grad_(True), t)                           # mask 3 empty: 0
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.5, 0.5, 0.0]]))
    assert not out.requires_grad
    torch.testing.assert_close(iou_targets(torch.full((2, 2, 3, 3), -1.0), torch.zeros(2, 1, 3, 3)), torch.ones(2, 2))


# ---------------------------------------------------------------- KA2ERLoss

def three_candidates(spatial_dims, best=(1, 2)):
    "B=2 samples x M=3 random masks, except that sample b's mask `best[b]` is close to the target."
    t = box_target(spatial_dims)
    m = rand(2, 3, *SHAPE[spatial_dims])
    for b, k in enumerate(best): m[b, k] = (2 * t[b, 0] - 1) * 5 + 0.1 * m[b, k]
    return m, t


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multimask_picks_lowest_seg_loss_and_trains_only_it(spatial_dims):
    masks, t = three_candidates(spatial_dims)
    masks.requires_grad_(True)
    iou = torch.rand(2, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    teacher = torch.rand(2, 1, *SHAPE[spatial_dims], generator=torch.Generator().manual_seed(3))
    cfg = LossConfig(kd_weight=0.7, iou_weight=1.5)
    out = KA2ERLoss(cfg)(masks, iou, t, teacher_prob=teacher)
    per_mask = torch.stack([segmentation_loss(masks[:, k:k + 1].detach(), t) for k in range(3)], 1)
    assert out["mask_index"].tolist() == per_mask.argmin(1).tolist() == [1, 2]
    assert out["mask_index"].dtype == torch.long
    torch.testing.assert_close(out["seg"], per_mask.min(1).values.mean())
    chosen = masks.detach()[[0, 1], [1, 2]].unsqueeze(1)
    torch.testing.assert_close(out["kd"], distillation_loss(chosen, teacher, cfg.kd_temperature).mean())
    torch.testing.assert_close(out["iou"], F.mse_loss(iou.detach(), iou_targets(masks.detach(), t)))
    torch.testing.assert_close(out["loss"], out["seg"] + 0.7 * out["kd"] + 1.5 * out["iou"])
    assert all(out[k].ndim == 0 and out[k].dtype == torch.float32 for k in ("loss", "seg", "kd", "iou"))
    out["loss"].backward()
    flows = (masks.grad.flatten(2).abs().sum(-1) > 0).tolist()
    assert flows == [[False, True, False], [False, False, True]]    # seg and kd only through the chosen mask
    assert (iou.grad != 0).all()                                     # the IoU head regresses all M


def test_kd_respects_has_teacher_and_missing_teacher():
    masks, t = three_candidates(2)
    iou = torch.full((2, 3), 0.5)
    teacher = torch.rand(2, 1, *SHAPE[2], generator=torch.Generator().manual_seed(4))
    loss = KA2ERLoss(LossConfig(kd_weight=1.0))
    full = loss(masks, iou, t, teacher_prob=teacher)
    chosen = masks[[0, 1], full["mask_index"]].unsqueeze(1)
    per_sample = distillation_loss(chosen, teacher, 2.0)
    teacher_nan = teacher.clone(); teacher_nan[0] = float("nan")    # a row without teacher may hold anything
    only_second = loss(masks, iou, t, teacher_prob=teacher_nan, has_teacher=torch.tensor([False, True]))
    torch.testing.assert_close(only_second["kd"], per_sample[1])
    assert torch.isfinite(only_second["loss"])
    none = loss(masks, iou, t, teacher_prob=teacher, has_teacher=[False, False])
    assert none["kd"] == 0 and none["loss"] == none["seg"] + none["iou"]
    no_teacher = loss(masks, iou, t)
    assert no_teacher["kd"] == 0
    torch.testing.assert_close(no_teacher["loss"], none["loss"])
    with pytest.raises(AmalgamError, match="has_teacher: expected 2 booleans"): loss(masks, iou, t, teacher, has_teacher=[True])
    with pytest.raises(AmalgamError, match="teacher_prob is None"): loss(masks, iou, t, has_teacher=[True, False])
    # kd_weight 0 turns distillation off entirely
    assert KA2ERLoss(LossConfig(kd_weight=0))(masks, iou, t, teacher_prob=teacher)["kd"] == 0


def test_single_mask_output_and_bf16_autocast():
    masks, t = three_candidates(3)
    one = masks[:, :1].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KA2ERLoss()(one.bfloat16(), torch.full((2, 1), 0.5).bfloat16(), t, teacher_prob=torch.full_like(t, 0.4))
    assert out["mask_index"].tolist() == [0, 0]
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert one.grad is not None and torch.isfinite(one.grad).all()
    ref = KA2ERLoss()(one.detach().bfloat16().float(), torch.full((2, 1), 0.5), t, teacher_prob=torch.full_like(t, 0.4))
    assert math.isclose(out["loss"].item(), ref["loss"].item(), rel_tol=1e-3)


def test_ka2er_loss_shape_errors():
    masks, t = three_candidates(2)
    loss = KA2ERLoss()
    with pytest.raises(AmalgamError, match="iou: expected shape"): loss(masks, torch.zeros(2, 2), t)
    with pytest.raises(AmalgamError, match="target: expected shape"): loss(masks, torch.zeros(2, 3), t[:, :, :-1])
    with pytest.raises(AmalgamError, match="teacher_prob: expected shape"): loss(masks, torch.zeros(2, 3), t, teacher_prob=t[:1])


def test_kd_only_where_the_teacher_is_confident():
    with pytest.raises(AmalgamError, match=r"kd_confidence: expected a number in \[0, 1\]"): LossConfig(kd_confidence=1.5)
    t = torch.zeros(2, 1, 8, 8); t[:, :, 2:6, 2:6] = 1
    masks, iou, teacher = torch.randn(2, 3, 8, 8), torch.rand(2, 3), torch.full((2, 1, 8, 8), 0.3)
    loss = KA2ERLoss(LossConfig(kd_weight=1.0))
    # nowhere confident: nothing to distil; everywhere: the plain loss
    assert loss(masks, iou, t, teacher_prob=teacher, teacher_weight=torch.zeros_like(t))["kd"] == 0
    torch.testing.assert_close(loss(masks, iou, t, teacher_prob=teacher, teacher_weight=torch.ones_like(t))["kd"],
                               loss(masks, iou, t, teacher_prob=teacher)["kd"])
    # an unsure teacher (flat logits) is masked out where a sure one is kept
    from amalgam.losses import teacher_confidence
    logits = torch.zeros(1, 3, 4, 4); logits[0, 1, :2] = 8.0
    assert teacher_confidence(logits, 0.9)[0, 0, :2].eq(1).all() and teacher_confidence(logits, 0.9)[0, 0, 2:].eq(0).all()
