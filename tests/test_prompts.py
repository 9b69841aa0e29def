"Prompt encoder, two-way transformer and mask decoder (amalgam.prompts): shapes, gradients, invariances and prompt validation."
import pytest
import torch

from amalgam.config import AmalgamError
from amalgam.prompts import Attention, MaskDecoder, PositionEmbeddingRandom, PromptEncoder, Prompts

STRIDES = (1, 2, 4, 8, 16, 32)
FS = 6
CHANNELS = (FS, FS, 2 * FS, 4 * FS, 8 * FS, 16 * FS)
DIM = 32


def features(spatial, b=1, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, *(n // s for n in spatial), generator=g).requires_grad_(requires_grad) for c, s in zip(CHANNELS, STRIDES)]


def parts(spatial_dims, num_classes=4, seed=0):
    torch.manual_seed(seed)
    return PromptEncoder(spatial_dims, DIM, num_classes), MaskDecoder(spatial_dims, CHANNELS, STRIDES, transformer_dim=DIM, num_heads=4)


def run(enc, dec, feats, prompts, multimask=True):
    image = tuple(feats[0].shape[2:])
    grid = tuple(feats[STRIDES.index(16)].shape[2:])
    sparse, dense = enc(prompts, image, grid)
    return dec(feats, enc.dense_pe(grid), sparse, dense, multimask_output=multimask)


def all_prompts(spatial, b=2):
    d = len(spatial)
    pts = torch.stack([torch.tensor([[1.0] * d, [s - 1.0 for s in spatial]])] * b)
    return Prompts(points=pts, point_labels=torch.tensor([[1, 0]] * b), boxes=torch.stack([torch.tensor([[0.0] * d, [s / 2 for s in spatial]])] * b),
                   masks=torch.randn(b, 1, *(s // 4 for s in spatial)), classes=torch.arange(b) % 4)


@pytest.mark.parametrize("spatial", [(64, 96), (32, 64, 32)])
@pytest.mark.parametrize("multimask,m", [(True, 3), (False, 1)])
def test_shapes(spatial, multimask, m):
    enc, dec = parts(len(spatial))
    masks, iou = run(enc, dec, features(spatial, b=2), all_prompts(spatial), multimask)
    assert masks.shape == (2, m, *spatial) and iou.shape == (2, m)
    assert torch.isfinite(masks).all() and torch.isfinite(iou).all()


@pytest.mark.parametrize("prompts,n_tokens", [
    (Prompts(points=torch.zeros(1, 3, 2), point_labels=torch.ones(1, 3, dtype=torch.long)), 4),  # + padding token (no box)
    (Prompts(points=torch.zeros(1, 3, 2), point_labels=torch.ones(1, 3, dtype=torch.long), boxes=torch.zeros(1, 2, 2)), 5),
    (Prompts(boxes=torch.zeros(1, 2, 2)), 2),
    (Prompts(classes=torch.tensor([1])), 1),
    (Prompts(masks=torch.zeros(1, 1, 16, 16)), 0),
])
def test_token_layout(prompts, n_tokens):
    enc, _ = parts(2)
    sparse, dense = enc(prompts, (64, 64), (4, 4))
    assert sparse.shape == (1, n_tokens, DIM) and dense.shape == (1, DIM, 4, 4)


def test_gradients_reach_every_parameter_and_every_feature_level():
    enc, dec = parts(3)
    spatial = (32, 32, 64)
    feats = features(spatial, b=2, requires_grad=True)
    # every prompt kind, plus the padding / no-class / no-mask embeddings, in both output modes
    sparse_only = Prompts(points=torch.tensor([[[3.0, 4.0, 5.0]]] * 2), point_labels=torch.tensor([[1], [0]]), classes=torch.tensor([-1, 1]))
    loss = 0
    for prompts in (all_prompts(spatial), sparse_only):
        for mm in (True, False):
            masks, iou = run(enc, dec, feats, prompts, mm)
            loss = loss + masks.square().mean() + iou.sum()
    loss.backward()
    no_grad = [n for n, p in [*enc.named_parameters(), *dec.named_parameters()] if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    # the up path really consumes the high-resolution skips, and the transformer the coarse levels
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_padding_points_ignore_their_coordinates():
    enc, _ = parts(2)
    p1 = Prompts(points=torch.tensor([[[5.0, 5.0], [0.0, 0.0]]]), point_labels=torch.tensor([[1, -1]]))
    p2 = Prompts(points=torch.tensor([[[5.0, 5.0], [-100.0, 1e6]]]), point_labels=torch.tensor([[1, -1]]))  # padding may be anywhere
    torch.testing.assert_close(enc(p1, (64, 64), (4, 4))[0], enc(p2, (64, 64), (4, 4))[0])


def test_point_position_and_label_change_tokens():
    enc, _ = parts(3)
    tok = lambda xyz, lab: enc(Prompts(points=torch.tensor([[xyz]]), point_labels=torch.tensor([[lab]])), (32, 32, 64), (2, 2, 4))[0][0, 0]
    assert not torch.allclose(tok([1.0, 2.0, 3.0], 1), tok([1.0, 2.0, 40.0], 1))
    assert not torch.allclose(tok([1.0, 2.0, 3.0], 1), tok([1.0, 2.0, 3.0], 0))


def test_box_is_inclusive_extent():
    "A box over the whole image encodes the normalised extent [0, 1] on every axis."
    enc, _ = parts(2)
    sparse, _ = enc(Prompts(boxes=torch.tensor([[[0.0, 0.0], [63.0, 31.0]]])), (64, 32), (4, 2))
    pe = enc.pe_layer._pe_encoding(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(sparse[0] - torch.cat([enc.point_embeddings[2].weight, enc.point_embeddings[3].weight]), pe)


def test_positional_code_of_point_matches_grid_cell():
    pe = PositionEmbeddingRandom(3, 16)
    grid = pe((2, 3, 4))
    stride = 8
    for cell in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        centre = torch.tensor([[[(c + 0.5) * stride for c in cell]]])
        torch.testing.assert_close(pe.forward_with_coords(centre, (16, 24, 32))[0, 0], grid[(slice(None), *cell)], atol=1e-5, rtol=1e-5)


def test_class_token_minus_one_is_no_class():
    enc, _ = parts(2)
    sparse, _ = enc(Prompts(classes=torch.tensor([-1, 2]), boxes=torch.zeros(2, 2, 2)), (64, 64), (4, 4))
    torch.testing.assert_close(sparse[0, -1], enc.not_a_point_embed.weight[0])
    torch.testing.assert_close(sparse[1, -1], enc.class_embed.weight[2])


def test_batch_elements_are_independent():
    enc, dec = parts(2)
    enc.eval(), dec.eval()
    feats, prompts = features((64, 64), b=2), all_prompts((64, 64))
    masks, iou = run(enc, dec, feats, prompts)
    for i in range(2):
        one = Prompts(**{k: v[i:i + 1] for k, v in prompts.given().items()})
        m, q = run(enc, dec, [f[i:i + 1] for f in feats], one)
        torch.testing.assert_close(m[0], masks[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(q[0], iou[i], atol=1e-4, rtol=1e-4)


def test_same_seed_same_output():
    spatial = (64, 64)
    outs = [run(*parts(2, seed=3), features(spatial), all_prompts(spatial, b=1))[0] for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    att = Attention(32, 4, downsample_rate=2)
    q, k = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    heads = lambda t: t.reshape(2, -1, 4, 4).transpose(1, 2)
    qh, kh, vh = heads(att.q_proj(q)), heads(att.k_proj(k)), heads(att.v_proj(k))
    ref = att.out_proj((torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1) @ vh).transpose(1, 2).flatten(2))
    torch.testing.assert_close(att(q, k, k), ref, atol=1e-5, rtol=1e-5)


SHAPE3 = (16, 16, 16)
BAD_PROMPTS = [
    (Prompts(), "empty"),
    (Prompts(points=torch.zeros(1, 1, 3)), "points and point_labels must be given together"),
    (Prompts(points=torch.tensor([[[3.0, 4.0, 16.0]]]), point_labels=torch.tensor([[1]])), r"points\[0, 0\] = \[3.0, 4.0, 16.0\]: outside the image of spatial shape \(16, 16, 16\)"),
    (Prompts(points=torch.tensor([[[3.0, -0.5, 1.0]]]), point_labels=torch.tensor([[0]])), "outside the image"),
    (Prompts(points=torch.tensor([[[3.0, float("nan"), 1.0]]]), point_labels=torch.tensor([[1]])), "outside the image"),
    (Prompts(points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1, dtype=torch.long)), "2 coordinates per point but the image is 3D"),
    (Prompts(points=torch.zeros(3, 3), point_labels=torch.ones(3, dtype=torch.long)), "expected B x N x d"),
    (Prompts(points=torch.zeros(1, 2, 3), point_labels=torch.ones(1, 3, dtype=torch.long)), "point_labels: expected shape"),
    (Prompts(points=torch.zeros(1, 1, 3), point_labels=torch.tensor([[3]])), r"point_labels\[0, 0\] = 3: unknown label"),
    (Prompts(points=torch.zeros(2, 1, 3), point_labels=torch.tensor([[1], [-1]])), "batch element 1 has no prompt"),
    (Prompts(boxes=torch.zeros(1, 2, 2)), "image is 3D"),
    (Prompts(boxes=torch.zeros(1, 3, 3)), "min and max corner"),
    (Prompts(boxes=torch.tensor([[[0.0, 0, 0], [15, 16, 15]]])), r"boxes\[0\] max corner"),
    (Prompts(boxes=torch.tensor([[[0.0, 9, 0], [15, 8, 15]]])), "on axis 1"),
    (Prompts(masks=torch.zeros(1, 2, 4, 4, 4)), "prompts.masks: expected B x 1"),
    (Prompts(masks=torch.zeros(1, 1, 8, 8, 8)), r"expects mask prompts of shape \(4, 4, 4\)"),
    (Prompts(classes=torch.tensor([0.5])), "integer class indices"),
    (Prompts(classes=torch.tensor([[1]])), "1-D tensor"),
    (Prompts(classes=torch.tensor([1, 4])), r"classes\[1\] = 4: out of range; the class vocabulary has 4 classes"),
    (Prompts(classes=torch.tensor([-2])), "out of range"),
    (Prompts(classes=torch.tensor([-1])), "batch element 0 has no prompt"),
    (Prompts(classes=torch.tensor([1, 2]), boxes=torch.zeros(1, 2, 3)), "batch sizes differ"),
    (Prompts(points=[[[1, 2, 3]]], point_labels=torch.ones(1, 1)), "expected a torch.Tensor"),
]


@pytest.mark.parametrize("prompts,match", BAD_PROMPTS)
def test_bad_prompts_fail_clearly_at_the_boundary(prompts, match):
    "`Prompts.validate`, which `Segmenter` and `BatchStream` call where prompts enter; the encoder's forward does math only."
    enc, _ = parts(3)
    with pytest.raises(AmalgamError, match=match):
        prompts.validate(SHAPE3, num_classes=enc.num_classes, mask_shape=enc.mask_input_size((1, 1, 1)))


def test_prompt_batch_must_match_image_batch():
    with pytest.raises(AmalgamError, match="batch size 2 but the image batch has 1"):
        Prompts(classes=torch.tensor([0, 1])).validate((16, 16), batch_size=1)


def test_decoder_rejects_mismatched_features():
    enc, dec = parts(2)
    feats = features((64, 64))
    feats[2] = torch.zeros(1, 7, 16, 16)
    with pytest.raises(AmalgamError, match=r"features at stride 4: expected shape \(1, 12, 16, 16\)"):
        run(enc, dec, feats, Prompts(classes=torch.tensor([0])))


@pytest.mark.parametrize("kwargs,match", [
    (dict(feature_channels=CHANNELS[:-1], feature_strides=STRIDES), "one channel count per stride"),
    (dict(feature_channels=CHANNELS, feature_strides=(1, 2, 4, 8, 16, 24)), "increase by integer factors"),
    (dict(feature_channels=CHANNELS, feature_strides=STRIDES, embed_stride=64), "not among feature_strides"),
    (dict(feature_channels=CHANNELS, feature_strides=STRIDES, num_heads=5), "must divide"),
    (dict(feature_channels=CHANNELS, feature_strides=STRIDES, num_multimask_outputs=0), "num_multimask_outputs"),
])
def test_bad_decoder_config(kwargs, match):
    with pytest.raises(AmalgamError, match=match):
        MaskDecoder(2, transformer_dim=DIM, **kwargs)


def test_bad_encoder_config():
    with pytest.raises(AmalgamError, match="embed_dim: must be even"):
        PromptEncoder(3, 33, 2)
    with pytest.raises(AmalgamError, match="spatial_dims: expected 2 or 3"):
        PromptEncoder(1, 32, 2)


def test_decoder_rejects_mismatched_prompt_embeddings():
    enc, dec = parts(2)
    feats = features((64, 64))
    sparse, dense = enc(Prompts(classes=torch.tensor([0])), (64, 64), (4, 4))
    for pe, sp, de in [(enc.dense_pe((2, 2)), sparse, dense), (enc.dense_pe((4, 4)), sparse[..., :8], dense),
                       (enc.dense_pe((4, 4)), sparse, dense[..., :2]), (enc.dense_pe((4, 4)), sparse.expand(2, -1, -1), dense)]:
        with pytest.raises(AmalgamError, match="do not match the image embedding"):
            dec(feats, pe, sp, de)


@pytest.mark.parametrize("embed_stride", [4, 8, 32])
def test_other_embedding_strides(embed_stride):
    torch.manual_seed(0)
    enc, dec = PromptEncoder(2, DIM, 2), MaskDecoder(2, CHANNELS, STRIDES, embed_stride=embed_stride, transformer_dim=DIM)
    grid = (64 // embed_stride, 128 // embed_stride)
    sparse, dense = enc(Prompts(points=torch.tensor([[[3.0, 100.0]]]), point_labels=torch.ones(1, 1, dtype=torch.long)), (64, 128), grid)
    masks, iou = dec(features((64, 128)), enc.dense_pe(grid), sparse, dense)
    assert masks.shape == (1, 3, 64, 128) and iou.shape == (1, 3)
    assert len(dec.output_upscaling) == STRIDES.index(embed_stride)
