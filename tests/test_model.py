"""KA2ER wiring (amalgam.model): shapes, gradients, expert-order invariance, ablation switches, baseline (and a fresh
KA2ER equal to it), task routing, expert volume statistics, config, bad input."""
import dataclasses
import json

import pytest
import torch

from amalgam.amalgamation import AmalgamationLayer
from amalgam.config import AmalgamError, write_json
from amalgam.experts import ExpertBank
from amalgam.model import KA2ER, KA2ERConfig, build_model, zscore
from amalgam.prompts import Prompts
from tiny_experts import tiny_test_expert

TASKS = {"ct_abdomen": ["liver", "spleen"], "ct_lung": ["nodule"]}
SHAPE = {2: (64, 96), 3: (32, 32, 64)}


def config(spatial_dims=2, **kw):
    return KA2ERConfig(spatial_dims=spatial_dims, feature_size=12, hidden_dim=32, num_heads=4, transformer_dim=32, iou_head_hidden_dim=32,
                       tasks=TASKS, **kw)


def bank(spatial_dims=2, order=("ct_abdomen", "ct_lung")):
    experts = {"ct_abdomen": dict(num_classes=3, seed=0), "ct_lung": dict(num_classes=2, seed=1)}
    return ExpertBank([tiny_test_expert(spatial_dims, name=n, **experts[n]) for n in order])


def image(spatial_dims=2, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 300 * torch.randn(b, 1, *SHAPE[spatial_dims], generator=g) + 40


def clicks(spatial_dims=2, b=2):
    pts = torch.tensor([[[5.0] * spatial_dims, [s - 3.0 for s in SHAPE[spatial_dims]]]] * b)
    return Prompts(points=pts, point_labels=torch.tensor([[1, 0]] * b))


@pytest.fixture(scope="module")
def model2d():
    "A 2D model with two experts, in eval mode, shared by the tests that only run it."
    return build_model(config(2), bank(2)).eval()


def check_output(out, b, m, spatial):
    assert out.masks.shape == (b, m, *spatial) and out.iou.shape == (b, m)
    assert out.expert_names == ("ct_abdomen", "ct_lung", "foundation")
    assert sorted(out.expert_weights) == [8, 16, 32]
    for s, w in out.expert_weights.items():
        assert w.shape == (b, 3, *(n // s for n in spatial))
        torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))


@pytest.mark.parametrize("multimask,m", [(True, 3), (False, 1)])
def test_shapes_2d(model2d, multimask, m):
    with torch.no_grad(): check_output(model2d(image(2), clicks(2), multimask_output=multimask), 2, m, SHAPE[2])


def test_shapes_3d():
    model = build_model(config(3), bank(3)).eval()
    with torch.no_grad():
        check_output(model(image(3, b=1), clicks(3, b=1)), 1, 3, SHAPE[3])
        check_output(model(image(3, b=1), task="ct_lung", multimask_output=False), 1, 1, SHAPE[3])


def test_automatic_mode_and_class_conditioned_clicks(model2d):
    x = image()
    with torch.no_grad():
        auto = model2d(x, task="ct_abdomen:spleen").masks
        other = model2d(x, task=["ct_abdomen:liver", "ct_abdomen:liver"]).masks
        one_class_task = model2d(x, task="ct_lung").masks
        explicit = model2d(x, Prompts(classes=torch.tensor([2, 2]))).masks
        conditioned = model2d(x, clicks(), task="ct_lung").masks
    assert not torch.allclose(auto, other)
    torch.testing.assert_close(one_class_task, explicit)
    assert conditioned.shape == auto.shape and not torch.allclose(conditioned, one_class_task)


def test_gradients_reach_trainable_parts_never_experts():
    experts = bank(2)
    model = build_model(config(2), experts)
    out = model(image(2), clicks(2), task="ct_abdomen:liver")
    (out.masks.square().mean() + out.iou.sum()).backward()
    for part in ("foundation", "amalgamation", "prompt_encoder", "decoder"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    expert_params = [p for e in experts for p in e.network.parameters()]
    assert expert_params and all(not p.requires_grad and p.grad is None for p in expert_params)
    opt = torch.optim.AdamW(model.trainable_parameters())
    ids = {id(p) for e in experts for p in e.network.parameters()}
    assert not any(id(p) in ids for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in model.parameters())
    assert not any(k.startswith("experts") for k in model.state_dict())


def perturb(module, seed=1, scale=0.2):
    "Move every parameter off its initial value, so no branch is an identity (or zero) by initialisation."
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for t in module.parameters(): t.add_(scale * torch.randn(t.shape, generator=g))


def test_expert_order_invariance():
    x, p = image(), dataclasses.replace(clicks(), classes=torch.tensor([0, 2]))
    a = build_model(config(), bank(order=("ct_abdomen", "ct_lung"))).eval()
    b = build_model(config(), bank(order=("ct_lung", "ct_abdomen"))).eval()
    perturb(a.amalgamation)  # the expert path (and the class bias) must matter for the comparison to mean something
    b.load_state_dict(a.state_dict())
    with torch.no_grad(): oa, ob = a(x, p), b(x, p)
    assert oa.expert_names == ob.expert_names
    torch.testing.assert_close(oa.masks, ob.masks)
    # the maths too, not only the sorted build: the same weights in an amalgamation layer that lists the experts the other way round
    al = a.amalgamation
    rev = AmalgamationLayer(a.foundation.channels, a.foundation.strides, {n: a.experts.feature_specs[n] for n in reversed(al.expert_names)},
                            scales=al.scales, hidden_dim=32, num_heads=4, spatial_dims=2,
                            num_classes=len(a.class_names))
    rev.load_state_dict(al.state_dict())
    c = KA2ER(a.foundation, a.experts, rev, a.prompt_encoder, a.decoder, a.class_names).eval()
    with torch.no_grad(): oc = c(x, p)
    assert oc.expert_names == ("ct_lung", "ct_abdomen", "foundation")
    torch.testing.assert_close(oc.masks, oa.masks, atol=1e-4, rtol=1e-4)
    for s in oa.expert_weights:
        torch.testing.assert_close(oc.expert_weights[s][:, [1, 0, 2]], oa.expert_weights[s], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switch", ["use_self_attention", "use_cross_attention", "use_adaptive_weighting",
                                    "task_routing"])
def test_each_ablation_switch_changes_the_output(switch):
    experts, x = bank(), image()
    p = dataclasses.replace(clicks(), classes=torch.tensor([0, 2]))  # class-conditioned clicks
    full = build_model(config(), experts).eval()
    perturb(full.amalgamation)
    ablated = build_model(config(**{switch: False}), experts).eval()
    missing, _ = ablated.load_state_dict(full.state_dict(), strict=False)
    assert missing == []  # the ablated model is the full one minus a branch
    with torch.no_grad(): of, oa = full(x, p), ablated(x, p)
    assert (of.masks - oa.masks).abs().max() > 1e-4
    if switch == "use_adaptive_weighting":
        torch.testing.assert_close(oa.expert_weights[8], torch.full_like(oa.expert_weights[8], 1 / 3))


def test_baseline_same_decoder():
    experts = bank()
    full, base = build_model(config(), experts), build_model(config(), None)
    assert base.experts is None and base.amalgamation is None
    counts = base.parameter_counts()
    assert counts["experts"] == counts["amalgamation"] == 0 and counts["decoder"] == full.parameter_counts()["decoder"]
    assert base.decoder.state_dict().keys() == full.decoder.state_dict().keys()
    out = base(image(), clicks())
    assert out.masks.shape == (2, 3, *SHAPE[2]) and out.expert_weights == {} and out.expert_names == ()


def test_fresh_ka2er_is_its_baseline():
    "Zero-initialised expert path and per-part seeds: a fresh KA2ER computes exactly what a fresh baseline computes."
    x = image()
    base = build_model(config(), None).eval()
    ka2er = build_model(config(), bank()).eval()
    opened = build_model(config(zero_init_expert_path=False), bank()).eval()
    for part in ("foundation", "prompt_encoder", "decoder"):  # the amalgamation takes no random numbers from the others
        ref = getattr(base, part).state_dict()
        for m in (ka2er, opened):
            assert all(torch.equal(v, getattr(m, part).state_dict()[k]) for k, v in ref.items()), part
    boxes = Prompts(boxes=torch.tensor([[[4.0, 8.0], [40.0, 60.0]]] * 2))
    prompts = [dict(prompts=clicks()), dict(task=["ct_abdomen:spleen", "ct_lung"]),
               dict(prompts=clicks(), task="ct_lung"), dict(prompts=boxes)]
    with torch.no_grad():
        for kw in prompts:
            ob, ok, oo = base(x, **kw), ka2er(x, **kw), opened(x, **kw)
            assert torch.equal(ob.masks, ok.masks) and torch.equal(ob.iou, ok.iou), kw
            assert not torch.allclose(ob.masks, oo.masks, atol=1e-3), kw
    # training moves the expert path off zero: the first step's gradient reaches it (through `back`)
    out = ka2er.train()(x, clicks())
    out.masks.square().mean().backward()
    assert all(ka2er.amalgamation.back[str(s)].weight.grad.abs().sum() > 0 for s in ka2er.amalgamation.scales)


def test_fine_scales_in_the_model():
    model = build_model(config(scales=(2, 4, 8, 16, 32), zero_init_expert_path=False), bank()).eval()
    with torch.no_grad(): out = model(image(), clicks())
    assert sorted(out.expert_weights) == [2, 4, 8, 16, 32]
    assert out.expert_weights[2].shape == (2, 3, 32, 48) and out.masks.shape == (2, 3, *SHAPE[2])
    with pytest.raises(AmalgamError, match=r"KA2ERConfig.scales: expected distinct foundation strides from \(1, 2, 4"):
        config(scales=(3, 8))
    with pytest.raises(AmalgamError, match="KA2ERConfig.scales"):
        config(scales=(8, 8))
    with pytest.raises(AmalgamError, match="KA2ERConfig.seed"):
        config(seed=-1)


def test_task_routing_biases_elements_with_a_class(monkeypatch):
    model = build_model(config(zero_init_expert_path=False), bank()).eval()
    passed = []
    real = model.amalgamation.forward
    monkeypatch.setattr(model.amalgamation, "forward",
                        lambda *a, **k: passed.append(k.get("source_bias")) or real(*a, **k))
    x, classes = image(), torch.tensor([1, -1])  # element 1: clicks without a class
    p = dataclasses.replace(clicks(), classes=classes)
    with torch.no_grad():
        neutral = model(x, p)
        model.amalgamation.class_bias["ct_lung"][1] = 2.0
        routed = model(x, p)
        model(x, clicks())  # no classes at all: records passed[2]
    assert passed[0].shape == (2, 3) and not passed[0].any() and passed[1][0, 1] == 2.0 and not passed[1][1].any()
    assert passed[2] is None  # no classes at all: no bias
    assert (routed.expert_weights[8][0, 1] > neutral.expert_weights[8][0, 1]).all()
    for s in routed.expert_weights: assert torch.equal(routed.expert_weights[s][1], neutral.expert_weights[s][1])
    assert not torch.allclose(routed.masks[0], neutral.masks[0]) and torch.equal(routed.masks[1], neutral.masks[1])
    # it is learnt from the elements that carry a class, for that class only
    model.train()(x, p).masks.square().mean().backward()
    grads = torch.stack([model.amalgamation.class_bias[n].grad for n in ("ct_abdomen", "ct_lung", "foundation")])
    assert grads[:, 1].abs().sum() > 0 and grads[:, [0, 2]].abs().sum() == 0
    assert build_model(config(task_routing=False), bank()).amalgamation.class_bias is None
    assert build_model(config(use_adaptive_weighting=False), bank()).amalgamation.class_bias is None


def test_expert_stats_reach_the_experts(monkeypatch):
    "`forward(expert_stats=...)` and `expert_features(stats=...)` hand the volume statistics to `ExpertBank.encode`."
    model = build_model(config(), bank()).eval()
    seen, real = [], model.experts.encode
    def encode(x, normalized=False, logits=False, stats=None, taps="encoder"):
        assert taps == model.expert_taps
        seen.append(stats)
        return real(x, normalized, logits, taps=taps)
    monkeypatch.setattr(model.experts, "encode", encode)
    stats = {n: torch.tensor([[[40.0, 300.0]], [[10.0, 200.0]]]) for n in model.experts.names}
    with torch.no_grad():
        model(image(), clicks(), expert_stats=stats)
        model(image(), clicks())
        model.expert_features(image(), stats=stats)
        model.expert_features(image(), logits=True)
    assert seen[0] is stats and seen[1] is None and seen[2] is stats and seen[3] is None
    feats = real(image())
    with pytest.raises(AmalgamError, match="expert_stats given with precomputed expert_features"):
        model(image(), clicks(), expert_features=feats, expert_stats=stats)
    with torch.no_grad():  # the baseline has no experts to tell
        build_model(config(), None)(image(), clicks(), expert_stats=stats)


def test_expert_stats_change_what_z_score_experts_see():
    "With z-score (MR) experts, volume statistics change the features, as `ExpertBank.encode(stats=...)` computes them."
    experts = ExpertBank([tiny_test_expert(2, name=n, modality="MR", num_classes=2, seed=i)
                          for i, n in enumerate(TASKS)])
    model = build_model(config(zero_init_expert_path=False), experts).eval()
    x = image()
    stats = {n: torch.tensor([[[400.0, 50.0]], [[-300.0, 900.0]]]) for n in TASKS}  # far from the patches' (40, 300)
    with torch.no_grad():
        with_stats, patch_stats = model(x, clicks(), expert_stats=stats), model(x, clicks())
        shared = model(x, clicks(), expert_features=experts.encode(x, stats=stats))
    assert torch.equal(with_stats.masks, shared.masks)
    assert not torch.allclose(with_stats.masks, patch_stats.masks, atol=1e-4)


def test_parameter_counts():
    experts = bank()
    model = build_model(config(), experts)
    c = model.parameter_counts()
    assert c["trainable"] == c["foundation"] + c["amalgamation"] + c["prompt_encoder"] + c["decoder"] == sum(p.numel() for p in model.parameters())
    assert c["experts"] == sum(p.numel() for e in experts for p in e.network.parameters()) > 0
    assert all(v > 0 for v in c.values())


def test_foundation_sees_z_scored_intensities():
    "The baseline depends on intensities only through the per-image z-score, so a positive affine intensity change does not alter it."
    model = build_model(config(), None).eval()
    x = image()
    with torch.no_grad(): a, b = model(x, clicks()).masks, model(3 * x - 1000, clicks()).masks
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    z = zscore(x)
    torch.testing.assert_close(z.mean((2, 3)), torch.zeros(2, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((2, 3), unbiased=False), torch.ones(2, 1), atol=1e-4, rtol=0)
    assert torch.equal(zscore(torch.full((1, 1, 4, 4), 7.0)), torch.zeros(1, 1, 4, 4))


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(config(seed=5), bank())
    after = torch.rand(1)
    assert torch.equal(before, after)
    b, c = build_model(config(seed=5), bank()), build_model(config(seed=6), bank())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_config_round_trip(tmp_path):
    cfg = config(3, scales=(2, 16, 32), use_cross_attention=False, zero_init_expert_path=False, task_routing=False,
                 seed=4)
    path = cfg.save(tmp_path / "run" / "ka2er_config.json")
    saved = json.loads(path.read_text())
    assert saved["scales"] == [2, 16, 32] and saved["zero_init_expert_path"] is False and saved["task_routing"] is False
    assert KA2ERConfig.load(path) == cfg
    assert KA2ERConfig.from_dict(cfg.to_dict()) == cfg
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg.to_dict(), "scale": [8]}))
    with pytest.raises(AmalgamError, match=r"bad.json: KA2ERConfig: unknown key\(s\) 'scale' \(did you mean 'scales'\?\)"):
        KA2ERConfig.load(bad)
    with pytest.raises(AmalgamError, match="config file not found"):
        KA2ERConfig.load(tmp_path / "missing.json")


def test_pretrained_foundation(tmp_path):
    src = build_model(config(seed=1), None)
    torch.save(src.foundation.state_dict(), tmp_path / "foundation.pt")
    model = build_model(config(seed=2, pretrained=str(tmp_path / "foundation.pt")), None)
    assert model.pretrained_report.complete
    for k, v in src.foundation.state_dict().items(): assert torch.equal(model.foundation.state_dict()[k], v)
    with pytest.raises(AmalgamError, match="checkpoint file not found"):
        build_model(config(pretrained=str(tmp_path / "nope.pt")), None)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(image()[..., :80], clicks()), r"not divisible by 32"),
    (lambda m: m(image()[:, :, None], clicks()), "expected 4 dims"),
    (lambda m: m(torch.cat([image(), image()], 1), clicks()), "expected 1 channel"),
    (lambda m: m(image()), "no prompts and no task"),
    (lambda m: m(image(), task="ct_abdomen"), "ambiguous"),
    (lambda m: m(image(), task="ct_abdomen:lvier"), "did you mean 'ct_abdomen:liver'"),
    (lambda m: m(image(), task=["ct_lung"] * 3), "3 task names for a batch of 2"),
    (lambda m: m(image(), Prompts(classes=torch.tensor([0, 1])), task="ct_lung"), "class is given twice"),
])
def test_bad_input_fails_clearly(model2d, call, match):
    with pytest.raises(AmalgamError, match=match):
        call(model2d)


@pytest.mark.parametrize("prompts,match", [
    (Prompts(points=torch.zeros(2, 1, 3), point_labels=torch.ones(2, 1, dtype=torch.long)), "image is 2D"),
    (Prompts(points=torch.tensor([[[64.0, 0.0]]] * 2), point_labels=torch.ones(2, 1, dtype=torch.long)),
     r"points\[0, 0\] = \[64.0, 0.0\]: outside the image of spatial shape \(64, 96\)"),
    (clicks(b=1), "batch size 1 but the image batch has 2"),
    (Prompts(masks=torch.zeros(2, 1, 8, 12)), r"expects mask prompts of shape \(16, 24\)"),
    (Prompts(classes=torch.tensor([0, 3])), r"classes\[1\] = 3: out of range"),
])
def test_bad_prompts_fail_clearly_at_the_boundary(model2d, prompts, match):
    "What `Segmenter` and `BatchStream` check before a batch reaches the model (its forward does math only)."
    grid = tuple(s // model2d.decoder.embed_stride for s in image().shape[2:])
    with pytest.raises(AmalgamError, match=match):
        prompts.validate(tuple(image().shape[2:]), batch_size=len(image()), num_classes=len(model2d.class_names),
                         mask_shape=model2d.prompt_encoder.mask_input_size(grid))


def test_inconsistent_parts_fail_clearly():
    m2 = build_model(config(), bank())
    with pytest.raises(AmalgamError, match="expert 'ct_abdomen' is 3D"):
        KA2ER(m2.foundation, ExpertBank([tiny_test_expert(3, name="ct_abdomen"), tiny_test_expert(3, name="ct_lung")]), m2.amalgamation,
              m2.prompt_encoder, m2.decoder, m2.class_names)
    with pytest.raises(AmalgamError, match="experts and amalgamation go together"):
        KA2ER(m2.foundation, None, m2.amalgamation, m2.prompt_encoder, m2.decoder, m2.class_names)
    with pytest.raises(AmalgamError, match="3 class tokens but 2 class names"):
        KA2ER(m2.foundation, m2.experts, m2.amalgamation, m2.prompt_encoder, m2.decoder, m2.class_names[:2])
    with pytest.raises(AmalgamError, match="does not match the amalgamation layer's experts"):
        KA2ER(m2.foundation, ExpertBank([tiny_test_expert(2, name="other")]), m2.amalgamation, m2.prompt_encoder, m2.decoder, m2.class_names)
    with pytest.raises(AmalgamError, match="spatial_dims: expected 2 or 3"):
        dataclasses.replace(config(), spatial_dims=4)


def test_expert_weight_figure(model2d):
    from amalgam.model import expert_weight_figure
    x = image()
    with torch.no_grad(): out = model2d(x, clicks())
    fig = expert_weight_figure(x, out, stride=16, batch_index=1)
    assert [t.z.shape for t in fig.data] == [SHAPE[2][::-1]] * 4
    torch.testing.assert_close(torch.as_tensor(fig.data[2].z), out.expert_weights[16][1, 1].repeat_interleave(16, 0).repeat_interleave(16, 1).T)
    with pytest.raises(AmalgamError, match="no expert weights at stride 4"):
        expert_weight_figure(x, out, stride=4)
    with torch.no_grad(): base = build_model(config(), None)(x, clicks())
    with pytest.raises(AmalgamError, match="baseline model without experts"):
        expert_weight_figure(x, base)


def test_precomputed_expert_features_give_the_same_output(model2d):
    "forward(expert_features=ExpertBank.encode(x)) equals forward(x): a training step can share one expert pass with the teachers."
    x = image()
    feats, logits = model2d.experts.encode(x, logits=True)
    with torch.no_grad():
        ref = model2d(x, clicks())
        shared = model2d(x, clicks(), expert_features=feats)
    torch.testing.assert_close(shared.masks, ref.masks, rtol=0, atol=0)
    torch.testing.assert_close(shared.iou, ref.iou, rtol=0, atol=0)
    assert all(torch.equal(shared.expert_weights[s], ref.expert_weights[s]) for s in ref.expert_weights)
    assert logits["ct_abdomen"].shape == (2, 3, *SHAPE[2])
    wrong = {n: [f[:1] for f in fs] for n, fs in feats.items()}
    with pytest.raises(AmalgamError, match=r"expert_features\['ct_abdomen'\]\[0\]: expected 2 x"):
        model2d(x, clicks(), expert_features=wrong)
    with pytest.raises(AmalgamError, match="baseline model, which has no experts"):
        build_model(config(), None)(x, clicks(), expert_features=feats)


def test_forward_leaves_prompt_checks_to_the_boundary(model2d, monkeypatch):
    "Checking prompt values reads them back from the device: `Segmenter` and `BatchStream` do it once, forward never."
    calls = []
    real = Prompts.validate
    monkeypatch.setattr(Prompts, "validate", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    with torch.no_grad():
        model2d(image(), clicks())
        model2d.decode(model2d.foundation(zscore(image())), clicks())
    assert calls == []


def test_expert_features_are_freed_before_the_decoder(model2d, monkeypatch):
    "Features the model computes itself (full-resolution stages included) do not stay alive while the decoder runs."
    import weakref
    refs, alive = [], []
    real_features, real_decode = model2d.expert_features, model2d.decode
    def features(image, logits=False, stats=None):
        out = real_features(image, logits, stats)
        refs.extend(weakref.ref(f) for fs in out.values() for f in fs)
        return out
    def decode(*args, **kwargs):
        alive.append(sum(r() is not None for r in refs))
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(model2d, "expert_features", features)
    monkeypatch.setattr(model2d, "decode", decode)
    with torch.no_grad(): model2d(image(), clicks())
    assert len(refs) == 6 and alive == [0]


def test_class_tokens_mean_the_same_class_after_a_run_is_saved_and_loaded(tmp_path):
    """The tasks given in the manifests' order (not sorted): the model saved as a run saves it (key-sorted JSON) and
    built again from that file answers every class prompt exactly as the trained one did."""
    tasks = {"ct_lung": ["lung", "nodule"], "ct_abdomen": ["liver", "spleen"]}  # as a manifest list may order them
    trained = build_model(dataclasses.replace(config(), tasks=tasks), bank()).eval()
    write_json(tmp_path / "config.json", {"model": trained.config.to_dict()})
    loaded = build_model(KA2ERConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["model"]), bank()).eval()
    loaded.load_state_dict(trained.state_dict())
    assert loaded.class_names == trained.class_names
    with torch.no_grad():
        for name in trained.class_names:
            assert torch.equal(loaded(image(), task=name).masks, trained(image(), task=name).masks), name
