"""Tests for amalgam.amalgamation: shapes, gradients, expert-order invariance, ablations, zero-initialised expert
path, fine scales, task routing (source bias), routing accuracy and loss, locality and linear memory."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import amalgam.amalgamation as am
from amalgam.amalgamation import (AmalgamationLayer, closest_stage, expert_stages, from_windows, pooled_context,
                                  routing_accuracy, routing_loss, to_windows)
from amalgam.config import AmalgamError
from amalgam.foundation import Foundation

F_CH, F_ST = (12, 12, 24, 48, 96, 192), (1, 2, 4, 8, 16, 32)
# two experts as nnU-Net builds them: different widths, depths and (for ct) anisotropic early strides
SPECS = {
    3: {"ct": [(8, (1, 1, 1)), (16, (1, 2, 2)), (32, (2, 4, 4)), (64, (4, 8, 8)), (64, (8, 16, 16)), (64, (16, 32, 32))],
        "mr": [(4, 1), (8, 2), (16, 4), (32, 8), (32, 16)]},
    2: {"ct": [(8, (1, 1)), (16, (1, 2)), (32, (2, 4)), (64, (4, 8)), (64, (8, 16)), (64, (16, 32))],
        "mr": [(4, 1), (8, 2), (16, 4), (32, 8), (32, 16)]},
}
SHAPE = {3: (32, 64, 96), 2: (64, 96)}


def foundation_feats(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *[n // s for n in shape], generator=g) for c, s in zip(F_CH, F_ST)]


def expert_feats(specs, shape, batch=1, seed=1):
    "Random frozen-expert features; grids rounded up as nnU-Net's padded convolutions produce them."
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in specs.items():
        out[name] = [torch.randn(batch, c, *[-(-n // s) for n, s in zip(shape, stride)], generator=g)
                     for c, stride in expert_stages(spec, len(shape), name)]
    return out


def make_layer(dims=3, specs=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"hidden_dim": 16, "num_heads": 2, "window_size": 2, **kw}
    return AmalgamationLayer(F_CH, F_ST, SPECS[dims] if specs is None else specs, spatial_dims=dims, **kw)


@pytest.fixture(params=[3, 2], ids=["3d", "2d"])
def dims(request):
    return request.param


# ---------------------------------------------------------------- shapes and weights

def test_shapes(dims):
    layer = make_layer(dims)
    ff, ef = foundation_feats(SHAPE[dims], batch=2), expert_feats(SPECS[dims], SHAPE[dims], batch=2)
    with torch.no_grad():
        out = layer(ff, ef)
    assert isinstance(out, am.AmalgamationOutput)
    assert [t.shape for t in out.features] == [t.shape for t in ff]
    assert out.expert_names == ("ct", "mr", "foundation")
    for s in (8, 16, 32):
        grid = tuple(n // s for n in SHAPE[dims])
        assert out.gold[s].shape == (2, 16, *grid) and out.weights[s].shape == (2, 3, *grid)
        assert (out.weights[s] >= 0).all()
        torch.testing.assert_close(out.weights[s].sum(1), torch.ones(2, *grid))
    # scales that are not amalgamated pass through untouched
    for i in range(3):
        assert out.features[i] is ff[i]


def test_stage_choice_and_spec_objects():
    stages = expert_stages([SimpleNamespace(channels=c, stride=s) for c, s in SPECS[3]["ct"]], 3, "ct")
    assert stages == expert_stages(SPECS[3]["ct"], 3, "ct")
    assert [closest_stage(stages, s) for s in (8, 16, 32)] == [3, 4, 5]
    layer = make_layer(3)
    assert layer.stage_for_scale == {8: {"ct": 3, "mr": 3}, 16: {"ct": 4, "mr": 4}, 32: {"ct": 5, "mr": 4}}
    # the shallower mr expert serves stride 32 from its stride-16 stage, resampled down
    with torch.no_grad():
        out = layer(foundation_feats(SHAPE[3]), expert_feats(SPECS[3], SHAPE[3]))
    assert out.gold[32].shape[2:] == (1, 2, 3)


@pytest.mark.parametrize("k", [1, 3])
def test_variable_number_of_experts(k):
    specs = {f"e{i}": [(4 * (i + 1), 2 ** j) for j in range(6)] for i in range(k)}
    layer = make_layer(3, specs)
    with torch.no_grad():
        out = layer(foundation_feats(SHAPE[3]), expert_feats(specs, SHAPE[3]))
    assert out.weights[8].shape[1] == k + 1 and out.expert_names[-1] == "foundation"


# ---------------------------------------------------------------- gradients

def test_gradients_reach_foundation_and_amalgamation_never_experts():
    torch.manual_seed(0)
    net = Foundation(feature_size=12, window_size=4)
    layer = make_layer(3, window_size=2, zero_init_residual=False)
    shape = (32, 32, 64)
    ef = expert_feats(SPECS[3], shape)
    ef = {n: [t.requires_grad_(True) for t in ts] for n, ts in ef.items()}  # even a caller's grad-enabled tensors must not get gradients
    out = layer(net(torch.randn(1, 1, *shape)), ef)
    (sum(t.pow(2).mean() for t in out.features) + sum(w.std() for w in out.weights.values())).backward()
    dead = lambda m: [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert dead(net) == []
    assert dead(layer) == []
    assert all(t.grad is None for ts in ef.values() for t in ts)


# ---------------------------------------------------------------- order invariance and ablations

def test_expert_order_invariance(dims):
    ff, ef = foundation_feats(SHAPE[dims]), expert_feats(SPECS[dims], SHAPE[dims])
    a = make_layer(dims)
    b = make_layer(dims, dict(reversed(list(SPECS[dims].items()))), seed=5)
    b.load_state_dict(a.state_dict())  # modules are keyed by expert name, so the weights carry over
    with torch.no_grad():
        out_a = a(ff, ef)
        out_a_rev = a(ff, dict(reversed(list(ef.items()))))
        out_b = b(ff, dict(reversed(list(ef.items()))))
    assert out_b.expert_names == ("mr", "ct", "foundation")
    for s in a.scales:
        assert torch.equal(out_a_rev.gold[s], out_a.gold[s])  # the mapping's order is irrelevant
        torch.testing.assert_close(out_b.gold[s], out_a.gold[s], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_b.features[F_ST.index(s)], out_a.features[F_ST.index(s)], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_b.weights[s][:, [1, 0, 2]], out_a.weights[s], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("switch", ["use_self_attention", "use_cross_attention", "use_adaptive_weighting"])
def test_each_ablation_changes_the_output(dims, switch):
    ff, ef = foundation_feats(SHAPE[dims]), expert_feats(SPECS[dims], SHAPE[dims])
    full = make_layer(dims, zero_init_residual=False)
    ablated = make_layer(dims, zero_init_residual=False, **{switch: False})
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and unexpected  # the ablated layer is the full one minus the switched-off modules
    with torch.no_grad():
        ref, abl = full(ff, ef), ablated(ff, ef)
    for s in full.scales:
        assert not torch.allclose(ref.gold[s], abl.gold[s], atol=1e-4)
        assert not torch.allclose(ref.features[F_ST.index(s)], abl.features[F_ST.index(s)], atol=1e-4)


def test_ablated_layer_without_attention_is_a_mean_of_projections():
    "Cross-attention off: an expert's conditioned feature is its projected, resampled feature; weighting off: a plain mean."
    layer = make_layer(3, use_self_attention=False, use_cross_attention=False, use_adaptive_weighting=False)
    ff, ef = foundation_feats(SHAPE[3]), expert_feats(SPECS[3], SHAPE[3])
    with torch.no_grad():
        out = layer(ff, ef)
        for s in layer.scales:
            blk, f_map = layer.blocks[str(s)], ff[F_ST.index(s)]
            feats = [am._pointwise(blk.proj_foundation, f_map)]
            for n in ("ct", "mr"):
                e = ef[n][layer.stage_for_scale[s][n]]
                e = F.interpolate(e, size=f_map.shape[2:], mode="trilinear") if e.shape[2:] != f_map.shape[2:] else e
                feats.append(am._pointwise(blk.proj_experts[n], e))
            m = torch.stack(feats).mean(0)
            expected = am._pointwise(blk.out_norm, m + am._pointwise(blk.mlp, am._pointwise(blk.mlp_norm, m)))
            torch.testing.assert_close(out.gold[s], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.weights[s], torch.full_like(out.weights[s], 1 / 3))


def test_temperature_controls_sharpness():
    layer = make_layer(2)
    ff, ef = foundation_feats(SHAPE[2]), expert_feats(SPECS[2], SHAPE[2])
    spread = {}
    with torch.no_grad():
        for t in (100.0, 0.01):
            for blk in layer.blocks.values():
                blk.log_temperature.fill_(math.log(t))
            w = layer(ff, ef).weights[8]
            spread[t] = (w.max(1).values - w.min(1).values).mean().item()
    assert spread[100.0] < 0.01 < 0.5 < spread[0.01]


# ---------------------------------------------------------------- windows, padding, locality

@pytest.mark.parametrize("grid,win", [((4, 6, 8), (2, 3, 4)), ((6, 9), (3, 3)), ((5, 7, 3), (5, 7, 3))])
def test_window_round_trip(grid, win):
    x = torch.randn(2, 5, *grid)
    t = to_windows(x, win)
    assert t.shape == (2 * math.prod(g // w for g, w in zip(grid, win)), math.prod(win), 5)
    assert torch.equal(from_windows(t, win, 2, grid), x)
    # window 0 holds exactly the first block of the grid
    first = x[(slice(None), slice(None), *(slice(0, w) for w in win))][0].reshape(5, -1).T
    assert torch.equal(t[0], first)


def test_pooled_context_is_the_pooled_window_around():
    x = torch.randn(1, 3, 8, 12)
    ctx, mask = pooled_context(x, (2, 2), 2)  # 4 x 6 windows; pooled grid 4 x 6 cut into 2 x 2 windows
    assert ctx.shape == (24, 4, 3) and mask is None
    pooled = F.avg_pool2d(x, 2)
    # fine window (row 3, col 5) starts at token (6, 10) -> pooled token (3, 5) -> pooled window (1, 2) = pooled rows 2-3, cols 4-5
    torch.testing.assert_close(ctx[3 * 6 + 5], pooled[0, :, 2:4, 4:6].reshape(3, -1).T)
    # a pooled grid that does not divide into windows: padded context slots are masked, every window keeps real keys
    ctx, mask = pooled_context(x, (2, 2), 3)  # pooled grid 3 x 4 -> windows of 2 x 2, padded to 4 x 4
    assert ctx.shape == (24, 4, 3) and mask is not None and not mask.all() and mask.any(1).all()
    torch.testing.assert_close(ctx[0], F.avg_pool2d(x, 3, ceil_mode=True)[0, :, 0:2, 0:2].reshape(3, -1).T)


def test_padding_never_leaks(monkeypatch):
    "Grids that need padding give the same result whatever the padded tokens hold: they are masked out as keys and cropped."
    layer = make_layer(3, window_size=3)  # stride-8 grid 4 x 8 x 12 -> padded to 6 x 9 x 12
    ff, ef = foundation_feats(SHAPE[3]), expert_feats(SPECS[3], SHAPE[3])
    with torch.no_grad():
        ref = layer(ff, ef)
        real_pad = am._pad_grid

        def noisy_pad(x, win):
            p = real_pad(x, win)
            if x.shape[1] == 1 or p.shape == x.shape:  # the validity mask itself is built by padding ones: leave it
                return p
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[(slice(None), slice(None), *(slice(0, n) for n in x.shape[2:]))] = True
            return torch.where(keep, p, 1e3 * torch.randn_like(p))

        monkeypatch.setattr(am, "_pad_grid", noisy_pad)
        noisy = layer(ff, ef)
    for s in layer.scales:
        torch.testing.assert_close(noisy.gold[s], ref.gold[s])


def test_attention_is_local():
    "A change outside a token's window and pooled context leaves that token's gold feature unchanged: no global attention."
    layer = make_layer(3, window_size=2, kv_pool=2, scales=(8,))
    ff, ef = foundation_feats(SHAPE[3]), expert_feats(SPECS[3], SHAPE[3])  # stride-8 grid 4 x 8 x 12
    with torch.no_grad():
        ref = layer(ff, ef).gold[8]
        ff2 = [t.clone() for t in ff]
        ff2[3][..., -1, -1, -1] += 10.0
        ef2 = {n: [t.clone() for t in ts] for n, ts in ef.items()}
        ef2["mr"][3][..., -1, -1, -1] += 10.0
        out = layer(ff2, ef2).gold[8]
    # token (0, 0, 0) sees window [0:2]^3 and the pooled window covering [0:4]^3 only
    torch.testing.assert_close(out[..., 0, 0, 0], ref[..., 0, 0, 0])
    assert not torch.allclose(out[..., -1, -1, -1], ref[..., -1, -1, -1])


# ---------------------------------------------------------------- memory is linear in voxels

def _cost(layer, shape):
    "Bytes saved for backward and attention-score elements of one forward pass at a single stride-8 scale."
    # only the stride-8 maps are read; the others just need the right channel counts
    ff = [torch.randn(1, c, *([n // 8 for n in shape] if s == 8 else [1, 1, 1]), requires_grad=True)
          for c, s in zip(F_CH, F_ST)]
    at_8 = layer.stage_for_scale[8]
    ef = {n: [torch.randn(1, c, *([-(-a // b) for a, b in zip(shape, st)] if i == at_8[n] else [1, 1, 1]))
              for i, (c, st) in enumerate(layer.stages[n])] for n in layer.expert_names}
    return _measure(layer, ff, ef)


def _measure(layer, ff, ef):
    "Bytes autograd saves and attention-score elements computed in one forward pass of `layer`."
    attn_elems, saved = [], []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kw):
        attn_elems.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real_sdpa(q, k, v, **kw)

    orig = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            layer(ff, ef)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    return sum(saved), sum(attn_elems)


def _exponent(sizes, values):
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def test_memory_grows_linearly_with_voxels():
    windowed = make_layer(3, window_size=4, kv_pool=2, scales=(8,))
    shapes = [(64, 64, 64), (64, 128, 128), (128, 128, 256)]  # stride-8 grids of 512, 2048, 8192 tokens
    voxels = [math.prod(s) for s in shapes]
    saved, attn = zip(*(_cost(windowed, s) for s in shapes))
    assert attn[0] > 0, "attention must run through F.scaled_dot_product_attention"
    assert _exponent(voxels, saved) < 1.1 and _exponent(voxels, attn) < 1.1
    # the measurement can tell: one global window is quadratic
    global_attn = make_layer(3, window_size=64, kv_pool=2, scales=(8,))
    _, attn_global = zip(*(_cost(global_attn, s) for s in shapes[:2]))
    assert _exponent(voxels[:2], attn_global) > 1.9


# ---------------------------------------------------------------- bad input

def test_bad_forward_inputs_are_named():
    layer = make_layer(3)
    ff, ef = foundation_feats(SHAPE[3]), expert_feats(SPECS[3], SHAPE[3])
    cases = [
        ((ff, {"ct": ef["ct"]}), "missing experts ['mr']"),
        ((ff, {**ef, "pet": ef["mr"]}), "unknown experts ['pet']"),
        ((ff, {**ef, "mr": ef["mr"][:4]}), "expert_features['mr']: expected 5 stage maps"),
        ((ff, {**ef, "ct": [*ef["ct"][:3], torch.randn(1, 7, 4, 8, 12), *ef["ct"][4:]]}), "expert_features['ct'][3]"),
        ((ff, {**ef, "mr": [t[:, :, 0] for t in ef["mr"]]}), "expert_features['mr'][0]"),
        ((ff[:5], ef), "expected 6 maps"),
        (([*ff[:3], torch.randn(2, 48, 4, 8, 12), *ff[4:]], ef), "foundation_features[3]"),
    ]
    for args, needle in cases:
        with pytest.raises(AmalgamError) as info:
            layer(*args)
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(scales=(8, 12)), "scale 12"), (dict(scales=()), "non-empty"), (dict(hidden_dim=10, num_heads=4), "multiple of num_heads"),
    (dict(specs={}), "at least one expert"), (dict(specs={"a.b": SPECS[3]["mr"]}), "not usable"),
    (dict(specs={"foundation": SPECS[3]["mr"]}), "not usable"), (dict(specs={"mr": [(32, (1, 2))]}), "expert_specs['mr'][0]"),
    (dict(specs={"mr": [(0, 1)]}), "expert_specs['mr'][0]"), (dict(init_temperature=0.0), "init_temperature"),
    (dict(window_size=0), "window_size"), (dict(num_classes=-1), "num_classes"),
])
def test_bad_constructor_arguments(kwargs, needle):
    with pytest.raises(AmalgamError) as info:
        make_layer(3, **kwargs)
    assert needle in str(info.value)


def test_mixed_precision():
    "Half-precision expert features under bfloat16 autocast: finite outputs, float32 weights that sum to one, gradients flow."
    layer = make_layer(2)
    ff = [t.requires_grad_(True) for t in foundation_feats(SHAPE[2])]
    ef = {n: [t.half() for t in ts] for n, ts in expert_feats(SPECS[2], SHAPE[2]).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(ff, ef)
    assert all(torch.isfinite(t).all() for t in out.features)
    assert out.weights[8].dtype == torch.float32
    torch.testing.assert_close(out.weights[8].sum(1), torch.ones_like(out.weights[8][:, 0]))
    out.features[3].float().sum().backward()
    assert ff[3].grad is not None and torch.isfinite(ff[3].grad).all()


def test_deterministic_with_seed():
    ff, ef = foundation_feats(SHAPE[2]), expert_feats(SPECS[2], SHAPE[2])
    with torch.no_grad():
        a, b = make_layer(2, seed=3)(ff, ef), make_layer(2, seed=3)(ff, ef)
    assert all(torch.equal(a.gold[s], b.gold[s]) and torch.equal(a.weights[s], b.weights[s]) for s in a.gold)


# ---------------------------------------------------------------- zero-initialised expert path

def test_zero_init_expert_path_starts_at_the_foundation(dims):
    "At initialisation the features are the foundation's exactly; only `back` learns at step 0, all of it after a step."
    ff, ef = foundation_feats(SHAPE[dims]), expert_feats(SPECS[dims], SHAPE[dims])
    layer = make_layer(dims)
    with torch.no_grad():
        out = layer(ff, ef)
    assert all(torch.equal(a, b) for a, b in zip(out.features, ff))
    with torch.no_grad():
        opened = make_layer(dims, zero_init_residual=False)(ff, ef)
    assert all(not torch.allclose(opened.features[F_ST.index(s)], ff[F_ST.index(s)], atol=1e-3) for s in (8, 16, 32))

    def step():
        layer.zero_grad()
        sum(t.square().mean() for t in layer([t.clone().requires_grad_(True) for t in ff], ef).features).backward()
        return {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    names = {n for n, _ in layer.named_parameters()}
    assert step() == {n for n in names if n.startswith("back.")}
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("back."): p.sub_(1e-2 * p.grad)
    assert step() == names


# ---------------------------------------------------------------- fine scales

def test_fine_scales(dims):
    "Every foundation stride can be amalgamated; the expert stage closest in stride serves it."
    shape = (32, 32, 64) if dims == 3 else SHAPE[2]
    layer = make_layer(dims, scales=(1, 2, 4, 8, 16, 32), zero_init_residual=False)
    assert layer.stage_for_scale[1] == {"ct": 0, "mr": 0}
    assert layer.stage_for_scale[2] == {"ct": 1, "mr": 1} and layer.stage_for_scale[4] == {"ct": 2, "mr": 2}
    ff = [t.requires_grad_(True) for t in foundation_feats(shape, batch=2)]
    out = layer(ff, expert_feats(SPECS[dims], shape, batch=2))
    for s in layer.scales:
        grid = tuple(n // s for n in shape)
        assert out.weights[s].shape == (2, 3, *grid) and out.features[F_ST.index(s)].shape == ff[F_ST.index(s)].shape
        torch.testing.assert_close(out.weights[s].sum(1), torch.ones(2, *grid))
    sum(t.square().mean() for t in out.features).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in ff)


def _cost_2d(layer, side, scale):
    "Bytes saved for backward and attention-score elements of one 2D forward pass at a single `scale`."
    ff = [torch.randn(1, c, *([side // s] * 2 if s == scale else [1, 1]), requires_grad=True)
          for c, s in zip(F_CH, F_ST)]
    ef = {n: [torch.randn(1, c, *([-(-side // b) for b in st] if i == layer.stage_for_scale[scale][n] else [1, 1]))
              for i, (c, st) in enumerate(layer.stages[n])] for n in layer.expert_names}
    return _measure(layer, ff, ef)


def test_memory_grows_linearly_at_fine_scales():
    for scale, sides in ((2, [64, 128, 256]), (1, [32, 64, 128])):  # grids of 1024, 4096, 16384 tokens
        layer = make_layer(2, window_size=4, kv_pool=2, scales=(scale,))
        saved, attn = zip(*(_cost_2d(layer, n, scale) for n in sides))
        voxels = [n * n for n in sides]
        assert attn[0] > 0 and _exponent(voxels, saved) < 1.1 and _exponent(voxels, attn) < 1.1


# ---------------------------------------------------------------- task routing: the source bias

def test_source_bias_is_a_per_element_prior_on_the_gate(dims):
    "softmax(logits + b) = normalise(w * exp(b)): the bias rescales each element's weights, in every window and scale."
    layer = make_layer(dims, window_size=2)  # several windows per element at stride 8, padding at 32 (grid 1 x 2 x 3)
    ff, ef = foundation_feats(SHAPE[dims], batch=2), expert_feats(SPECS[dims], SHAPE[dims], batch=2)
    bias = torch.tensor([[1.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        plain, biased = layer(ff, ef), layer(ff, ef, source_bias=bias)
    for s in layer.scales:
        expected = plain.weights[s] * bias.exp().view(2, 3, *[1] * dims)
        torch.testing.assert_close(biased.weights[s], expected / expected.sum(1, keepdim=True), atol=1e-6, rtol=1e-5)
        assert torch.equal(biased.weights[s][1], plain.weights[s][1])
    # without adaptive weighting the logits are zero: the weights are softmax(bias) everywhere
    uniform = make_layer(dims, use_adaptive_weighting=False)
    with torch.no_grad():
        w = uniform(ff, ef, source_bias=bias).weights[8]
    torch.testing.assert_close(w, bias.softmax(1).view(2, 3, *[1] * dims).expand_as(w))
    with pytest.raises(AmalgamError, match=r"source_bias: expected a tensor 2 x 3"):
        layer(ff, ef, source_bias=bias[:1])


def test_class_bias_table():
    layer = make_layer(2, num_classes=4)
    assert set(layer.class_bias) == {"ct", "mr", "foundation"}
    assert all(p.shape == (4,) and not p.any() for p in layer.class_bias.values())
    assert layer.source_bias(None) is None and make_layer(2).source_bias(torch.tensor([0])) is None
    assert make_layer(2, num_classes=4, use_adaptive_weighting=False).class_bias is None
    with torch.no_grad():
        layer.class_bias["mr"][2] = 3.0
        layer.class_bias["foundation"][0] = -1.0
    torch.testing.assert_close(layer.source_bias(torch.tensor([2, -1, 0])),
                               torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    # keyed by source name: a layer listing the experts the other way round loads it and gives the same bias per source
    rev = make_layer(2, dict(reversed(list(SPECS[2].items()))), num_classes=4)
    rev.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rev.source_bias(torch.tensor([2]))[:, [1, 0, 2]], layer.source_bias(torch.tensor([2])))


def test_class_bias_learns_only_from_elements_with_a_class():
    layer = make_layer(2, num_classes=3, zero_init_residual=False)
    ff, ef = foundation_feats(SHAPE[2], batch=2), expert_feats(SPECS[2], SHAPE[2], batch=2)
    out = layer(ff, ef, source_bias=layer.source_bias(torch.tensor([1, -1])))
    routing_loss(out.weights, torch.tensor([0, 0])).backward()
    grads = torch.stack([layer.class_bias[n].grad for n in ("ct", "mr", "foundation")], -1)
    assert grads[1].abs().sum() > 0 and grads[[0, 2]].abs().sum() == 0  # only class 1 was asked for
    assert grads[1, 0] < 0  # the loss pulls class 1 toward expert 0, its element's own expert


# ---------------------------------------------------------------- routing accuracy and loss

def _hand(*rows, grid=(2, 3)):
    "Hand-made weights: per element, the value of each source on every token of the grid."
    return torch.tensor(rows, dtype=torch.float)[..., None, None].expand(-1, -1, *grid).clone()


def test_routing_accuracy_cases():
    w = {8: _hand([0.6, 0.1, 0.3], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6])}
    assert routing_accuracy(w, torch.tensor([0, 1, -1])).item() == 1.0
    assert routing_accuracy(w, torch.tensor([1, 0, -1])).item() == 0.0
    assert routing_accuracy(w, torch.tensor([0, 0, -1])).item() == 0.5
    assert routing_accuracy(w, torch.tensor([-1, -1, 0])).item() == 0.5  # a tie between the experts shares the credit
    # the foundation channel does not compete: element 2's foundation weight 0.6 is the largest but not an expert's
    assert routing_accuracy({8: _hand([0.1, 0.2, 0.7])}, torch.tensor([1])).item() == 1.0
    # spatial means decide, not single tokens; and the result is the mean over scales
    spread = torch.zeros(1, 3, 2, 2)
    spread[0, 0, 0, 0], spread[0, 1] = 0.6, 0.2
    spread[0, 2] = 1 - spread[0, :2].sum(0)
    assert routing_accuracy({4: spread}, torch.tensor([1])).item() == 1.0  # means 0.15 vs 0.2 (0.6 > 0.2 on one token)
    assert routing_accuracy({4: spread, 8: _hand([0.6, 0.1, 0.3])}, torch.tensor([1])).item() == 0.5
    assert routing_accuracy(w, torch.tensor([-1, -1, -1])).isnan()


def test_routing_loss_prefers_the_own_expert_and_reaches_the_gate():
    w = {8: _hand([0.6, 0.1, 0.3])}
    low, high = routing_loss(w, torch.tensor([0])), routing_loss(w, torch.tensor([1]))
    assert low < high
    torch.testing.assert_close(low, torch.tensor(-math.log(0.6 / 0.7)))
    logits = torch.zeros(2, 3, 2, 2, requires_grad=True)
    loss = routing_loss({8: logits.softmax(1), 16: logits[..., :1, :1].softmax(1)}, torch.tensor([1, -1]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    loss.backward()
    assert (logits.grad[0, 1] < 0).all() and (logits.grad[0, 0] > 0).all() and logits.grad[1].abs().sum() == 0
    none = routing_loss({8: logits.softmax(1)}, torch.tensor([-1, -1]))
    assert none.item() == 0.0 and none.requires_grad
    # through a real gate: the loss on the layer's weights gives its gate parameters a gradient
    layer = make_layer(2)
    out = layer(foundation_feats(SHAPE[2], batch=2), expert_feats(SPECS[2], SHAPE[2], batch=2))
    routing_loss(out.weights, torch.tensor([1, 0])).backward()
    assert all(layer.blocks[str(s)].gate_q.weight.grad.abs().sum() > 0 for s in layer.scales)


@pytest.mark.parametrize("own,needle", [
    (torch.tensor([0, 2]), "own[1] = 2 is not an expert channel 0..1"), (torch.tensor([-2, 0]), "own[0] = -2"),
    (torch.tensor([0.0, 1.0]), "integer expert channels"), (torch.tensor([0]), "must be 2 integer"),
])
def test_routing_bad_own(own, needle):
    w = {8: _hand([0.6, 0.1, 0.3], [0.1, 0.5, 0.4])}
    for fn in (routing_accuracy, routing_loss):
        with pytest.raises(AmalgamError) as info:
            fn(w, own)
        assert needle in str(info.value)
    with pytest.raises(AmalgamError, match="no expert weights"):
        routing_loss({}, torch.tensor([0]))
