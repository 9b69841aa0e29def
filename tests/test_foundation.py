"Tests for amalgam.foundation: encoder shapes, input checks, padding, and checkpoint loading with a coverage report."
import argparse
import traceback

import pytest
import torch
from monai.networks.nets import SwinUNETR

from amalgam.config import AmalgamError
from amalgam.foundation import Foundation, LoadReport, crop_to, load_pretrained, pad_to_multiple

FS = 12
WIN = 4  # smaller Swin windows than the default 7 keep these CPU tests fast; the code paths are the same


def ssl_state_dict(swin: torch.nn.Module) -> dict:
    """A Swin-ViT state dict renamed the way the public `model_swinvit.pt` stores it: DataParallel's `module.` prefix, no
    `swinViT.` prefix, the block MLPs named `fc1`/`fc2`, plus the final `norm` the public file carries (MONAI's
    SwinTransformer has no such module; see Project-MONAI/research-contributions #150)."""
    sd = {}
    for k, v in swin.state_dict().items():
        sd["module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v.clone()
    last = swin.layers4[0].downsample.reduction.out_features
    sd["module.norm.weight"], sd["module.norm.bias"] = torch.ones(last), torch.zeros(last)
    return {"state_dict": sd}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return Foundation(feature_size=FS, window_size=WIN).eval()


@pytest.fixture()
def ssl_file(tmp_path, source):
    p = tmp_path / "model_swinvit.pt"
    torch.save(ssl_state_dict(source.swinViT), p)
    return p


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("dims,in_ch,shape", [(3, 2, (64, 32, 32)), (2, 1, (64, 64)), (2, 3, (32, 96))])
def test_shapes(dims, in_ch, shape):
    torch.manual_seed(0)
    net = Foundation(spatial_dims=dims, in_channels=in_ch, feature_size=FS, window_size=WIN).eval()
    assert net.strides == (1, 2, 4, 8, 16, 32)
    assert net.channels == (FS, FS, 2 * FS, 4 * FS, 8 * FS, 16 * FS)
    with torch.no_grad():
        feats = net(torch.randn(1, in_ch, *shape))
    assert [tuple(f.shape) for f in feats] == [(1, c, *[n // s for n in shape]) for c, s in zip(net.channels, net.strides)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_v2_and_checkpointing_shapes():
    net = Foundation(spatial_dims=2, feature_size=FS, window_size=WIN, use_v2=True, use_checkpoint=True)
    feats = net(torch.randn(1, 1, 64, 64))
    assert [f.shape[1] for f in feats] == list(net.channels)
    feats[-1].mean().backward()
    assert net.swinViT.layers1c[0].layer.conv1.conv.weight.grad is not None


def test_matches_monai_swinunetr_encoder():
    "Same modules, same keys: loaded with a SwinUNETR's weights the foundation reproduces the skip features SwinUNETR computes."
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, window_size=WIN).eval()
    net = Foundation(feature_size=FS, window_size=WIN).eval()
    rep = net.load_state_dict(ref.state_dict(), strict=False)
    assert rep.missing_keys == [] and all(k.startswith(("decoder", "out.")) for k in rep.unexpected_keys)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        hidden = ref.swinViT(x, ref.normalize)
        expected = [ref.encoder1(x), ref.encoder2(hidden[0]), ref.encoder3(hidden[1]), ref.encoder4(hidden[2]), hidden[3], ref.encoder10(hidden[4])]
        for a, b in zip(net(x), expected):
            torch.testing.assert_close(a, b)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = Foundation(spatial_dims=2, feature_size=FS, window_size=WIN)
    feats = net(torch.randn(2, 1, 64, 64))
    sum(f.pow(2).mean() for f in feats).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("shape,needle", [
    ((1, 1, 33, 64, 64), "pad to (64, 64, 64)"),
    ((1, 1, 32, 32, 48), "not divisible by 32"),
    ((1, 1, 32, 32, 32), "single voxel at stride 32"),
    ((1, 2, 32, 32, 64), "expected 1 channel"),
    ((1, 32, 32, 64), "expected 5 dims"),
])
def test_bad_sizes_fail_clearly(shape, needle):
    net = Foundation(feature_size=FS, window_size=WIN)
    with pytest.raises(AmalgamError, match=needle.replace("(", r"\(").replace(")", r"\)")) as info:
        net(torch.randn(*shape))
    # raised by the foundation's own check, not from deep inside MONAI
    assert len(traceback.extract_tb(info.value.__traceback__)) <= 6
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "check_input"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(spatial_dims=1), "spatial_dims"), (dict(feature_size=16), "multiple of 12"),
    (dict(depths=(2, 2, 2)), "4 entries"), (dict(num_heads=(5, 6, 12, 24)), "num_heads[0]"), (dict(drop_path_rate=2.0), "drop_path_rate"),
])
def test_bad_constructor_arguments(kwargs, needle):
    with pytest.raises(AmalgamError) as info:
        Foundation(**{"feature_size": FS, **kwargs})
    assert needle in str(info.value)


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("shape", [(33, 40, 17), (64, 64), (20, 95)])
@pytest.mark.parametrize("mode", ["constant", "replicate", "circular", "reflect"])
def test_pad_and_crop_round_trip(shape, mode):
    x = torch.randn(2, 3, *shape)
    padded, orig = pad_to_multiple(x, 32, mode=mode)
    assert orig == shape and all(s % 32 == 0 and s - o < 32 for s, o in zip(padded.shape[2:], shape))
    assert torch.equal(crop_to(padded, orig), x)


def test_padded_input_goes_through_and_crops_back():
    net = Foundation(spatial_dims=2, feature_size=FS, window_size=WIN).eval()
    x = torch.randn(1, 1, 50, 33)
    padded, orig = pad_to_multiple(x)
    with torch.no_grad():
        assert crop_to(net(padded)[0], orig).shape == (1, FS, 50, 33)


def test_pad_errors():
    with pytest.raises(AmalgamError, match="mode"):
        pad_to_multiple(torch.randn(1, 1, 8, 8), mode="wrap")
    with pytest.raises(AmalgamError, match="reflect padding cannot"):
        pad_to_multiple(torch.randn(1, 1, 8, 8), mode="reflect")
    with pytest.raises(AmalgamError, match="circular padding cannot"):
        pad_to_multiple(torch.randn(1, 1, 8, 8), mode="circular")
    with pytest.raises(AmalgamError, match="cannot crop"):
        crop_to(torch.randn(1, 1, 8, 8), (9, 8))


# ---------------------------------------------------------------- load_pretrained

def test_ssl_checkpoint_has_the_public_key_format(ssl_file):
    sd = torch.load(ssl_file, weights_only=True)["state_dict"]
    for key in ["module.patch_embed.proj.weight", "module.patch_embed.proj.bias",
                "module.layers1.0.blocks.0.norm1.weight", "module.layers1.0.blocks.0.attn.relative_position_bias_table",
                "module.layers1.0.blocks.0.attn.relative_position_index", "module.layers1.0.blocks.0.attn.qkv.weight",
                "module.layers1.0.blocks.1.attn.proj.bias", "module.layers1.0.blocks.0.mlp.fc1.weight", "module.layers3.0.blocks.1.mlp.fc2.bias",
                "module.layers1.0.downsample.reduction.weight", "module.layers4.0.downsample.norm.bias", "module.norm.weight"]:
        assert key in sd, key
    assert not any("swinViT" in k or "linear1" in k for k in sd)
    # the format is the one MONAI's SwinUNETR.load_from reads: it must accept the file without a KeyError
    SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, window_size=WIN).load_from(torch.load(ssl_file, weights_only=True))


def test_ssl_checkpoint_loads_every_encoder_weight(ssl_file, source):
    torch.manual_seed(1)
    target = Foundation(feature_size=FS, window_size=WIN).eval()
    rep = load_pretrained(target, ssl_file)
    assert isinstance(rep, LoadReport) and rep.format == "ssl" and rep.complete and rep.source == ssl_file
    swin_keys = [k for k in target.state_dict() if k.startswith("swinViT.")]
    assert sorted(rep.matched) == sorted(swin_keys)
    assert rep.shape_mismatched == {}
    assert rep.unexpected == ["module.norm.weight", "module.norm.bias"]
    # the conv encoder blocks are not in an SSL checkpoint: reported missing, but expected
    assert {k.split(".")[0] for k in rep.missing} == {"encoder1", "encoder2", "encoder3", "encoder4", "encoder10"}
    assert rep.missing_required == []
    for k, v in source.swinViT.state_dict().items():
        assert torch.equal(target.swinViT.state_dict()[k], v), k
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        for a, b in zip(target.swinViT(x), source.swinViT(x)):
            assert torch.equal(a, b)
    text = rep.summary()
    assert "ssl format" in text and f"{len(swin_keys)}/{len(swin_keys)}" in text and "module.norm.weight" in text


def test_same_weights_as_monai_load_from(ssl_file):
    "Our key mapping agrees with MONAI's own reader of the format, tensor for tensor."
    ref = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, window_size=WIN)
    ref.load_from(torch.load(ssl_file, weights_only=True))
    net = Foundation(feature_size=FS, window_size=WIN)
    load_pretrained(net, ssl_file)
    for k, v in ref.swinViT.state_dict().items():
        assert torch.equal(net.swinViT.state_dict()[k], v), k


def test_plain_state_dicts(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    rep = load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "plain.pt")
    assert rep.format == "plain" and rep.missing == [] and rep.unexpected == [] and len(rep.matched) == len(source.state_dict())
    # a whole SwinUNETR, saved from DataParallel: decoder keys are unexpected, everything of ours loads
    unetr = SwinUNETR(in_channels=1, out_channels=3, feature_size=FS, window_size=WIN)
    torch.save({"state_dict": {"module." + k: v for k, v in unetr.state_dict().items()}}, tmp_path / "unetr.pt")
    net = Foundation(feature_size=FS, window_size=WIN)
    rep = load_pretrained(net, tmp_path / "unetr.pt")
    assert rep.missing == [] and rep.unexpected and all(k.startswith(("module.decoder", "module.out.")) for k in rep.unexpected)
    assert torch.equal(net.encoder10.layer.conv1.conv.weight, unetr.encoder10.layer.conv1.conv.weight)
    # the pre-2022 SSL attribute name `swin_vit`
    torch.save({"state_dict": {"swin_vit." + k: v for k, v in source.swinViT.state_dict().items()}}, tmp_path / "old.pt")
    assert load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "old.pt").complete


def test_missing_key_raises_unless_partial(tmp_path, source):
    ck = ssl_state_dict(source.swinViT)
    del ck["state_dict"]["module.layers3.0.blocks.0.mlp.fc1.weight"]
    torch.save(ck, tmp_path / "partial.pt")
    target = Foundation(feature_size=FS, window_size=WIN)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AmalgamError, match="swinViT.layers3.0.blocks.0.mlp.linear1.weight"):
        load_pretrained(target, tmp_path / "partial.pt")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a refused load must not touch the model"
    rep = load_pretrained(target, tmp_path / "partial.pt", allow_partial=True)
    assert rep.missing_required == ["swinViT.layers3.0.blocks.0.mlp.linear1.weight"] and not rep.complete
    assert torch.equal(target.swinViT.patch_embed.proj.weight, source.swinViT.patch_embed.proj.weight)
    assert torch.equal(target.swinViT.layers3[0].blocks[0].mlp.linear1.weight, before["swinViT.layers3.0.blocks.0.mlp.linear1.weight"])


def test_shape_mismatch_raises_and_is_reported(tmp_path, source):
    ck = ssl_state_dict(source.swinViT)
    ck["state_dict"]["module.patch_embed.proj.weight"] = torch.randn(FS, 4, 2, 2, 2)  # a 4-channel checkpoint
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(AmalgamError, match=r"swinViT.patch_embed.proj.weight \(12, 4, 2, 2, 2\) vs model \(12, 1, 2, 2, 2\)"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "mismatch.pt")
    rep = load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "mismatch.pt", allow_partial=True)
    assert rep.shape_mismatched == {"swinViT.patch_embed.proj.weight": ((FS, 4, 2, 2, 2), (FS, 1, 2, 2, 2))}
    assert rep.missing_required == ["swinViT.patch_embed.proj.weight"]
    # a checkpoint of another width: only the width-free relative position tables fit, so the load is refused
    torch.manual_seed(0)
    torch.save(ssl_state_dict(Foundation(feature_size=24, window_size=WIN).swinViT), tmp_path / "wide.pt")
    with pytest.raises(AmalgamError, match="partly initialised"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "wide.pt")
    rep = load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "wide.pt", allow_partial=True)
    assert rep.shape_mismatched["swinViT.layers1.0.blocks.0.attn.qkv.weight"] == ((72, 24), (36, 12))
    assert all(k.endswith(("relative_position_bias_table", "relative_position_index")) for k in rep.matched)
    # a file of some other network fits nothing, which is refused even with allow_partial
    torch.save({"state_dict": {"module.layers1.0.fc.weight": torch.randn(3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(AmalgamError, match="no weight in the checkpoint fits"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "other.pt", allow_partial=True)


def test_unexpected_keys_are_reported(tmp_path, source):
    ck = ssl_state_dict(source.swinViT)
    ck["state_dict"]["module.rotation_head.weight"] = torch.randn(4, 16 * FS)
    torch.save(ck, tmp_path / "extra.pt")
    rep = load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "extra.pt")
    assert rep.complete and "module.rotation_head.weight" in rep.unexpected


def test_loads_weights_only(tmp_path, source, monkeypatch):
    ck = ssl_state_dict(source.swinViT)
    ck["args"] = argparse.Namespace(feature_size=FS)  # arbitrary pickled objects are refused
    torch.save(ck, tmp_path / "pickled.pt")
    with pytest.raises(AmalgamError, match="weights-only"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "pickled.pt")
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    torch.save(ssl_state_dict(source.swinViT), tmp_path / "ok.pt")
    load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "ok.pt")
    assert seen == [True]


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(AmalgamError, match="not found"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "nope.pt")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    with pytest.raises(AmalgamError, match="expected a state dict"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "tensor.pt")
    torch.save({"state_dict": {"module.patch_embed.proj.weight": 3}}, tmp_path / "notensor.pt")
    with pytest.raises(AmalgamError, match="not named tensors"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "notensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AmalgamError, match="garbage.pt"):
        load_pretrained(Foundation(feature_size=FS, window_size=WIN), tmp_path / "garbage.pt")
