"Tests for amalgam.amalgamation: shapes, gradients, expert-order invariance, ablations, locality and linear memory."
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import amalgam.amalgamation as am
from amalgam.amalgamation import AmalgamationLayer, closest_stage, expert_stages, from_windows, pooled_context, to_windows
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
    layer = make_layer(3, window_size=2)
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
    full, ablated = make_layer(dims), make_layer(dims, **{switch: False})
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
    attn_elems = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kw):
        attn_elems.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real_sdpa(q, k, v, **kw)

    saved = []
    # only the stride-8 maps are read; the others just need the right channel counts
    ff = [torch.randn(1, c, *([n // 8 for n in shape] if s == 8 else [1, 1, 1]), requires_grad=True) for c, s in zip(F_CH, F_ST)]
    ef = {n: [torch.randn(1, c, *([-(-a // b) for a, b in zip(shape, st)] if i == layer.stage_for_scale[8][n] else [1, 1, 1]))
              for i, (c, st) in enumerate(layer.stages[n])] for n in layer.expert_names}
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
    (dict(window_size=0), "window_size"),
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
