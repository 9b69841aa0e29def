"Evaluation metrics (amalgam.metrics): Dice/HD95/NSD on hand-made 2D and 3D masks with known answers, per class, empty-mask conventions, bootstrap CIs, summaries and the figure."
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from amalgam.config import AmalgamError
from amalgam.metrics import bootstrap_ci, case_metrics, class_metrics, dice_ci_figure, per_class_table, summarize


def box(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(l, l + size) for l in lo)] = True
    return m


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("k", [1, 2, 3])
def test_shifted_square_2d_anisotropic(k):
    s, spacing = 8, (2.5, 0.7)
    gt = box((20, 20), (4, 5), s)
    pred = box((20, 20), (4 + k, 5), s)            # shifted by k rows = k * 2.5 mm
    m = case_metrics(pred, gt, spacing, nsd_tolerance_mm=k * 2.5)
    assert m["dice"] == pytest.approx((s - k) / s)
    assert m["hd95"] == pytest.approx(k * 2.5)
    assert m["nsd"] == pytest.approx(1.0)
    assert case_metrics(pred, gt, spacing, nsd_tolerance_mm=k * 2.5 - 0.1)["nsd"] < 1
    # shifting along the other axis instead measures in that axis's spacing
    pred_cols = box((20, 20), (4, 5 + k), s)
    assert case_metrics(pred_cols, gt, spacing)["hd95"] == pytest.approx(k * 0.7)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_offset_cubes_3d_anisotropic(axis):
    s, k, spacing = 6, 2, (3.0, 0.8, 1.5)
    lo = [3, 3, 3]
    gt = box((14, 14, 14), lo, s)
    lo[axis] += k
    pred = box((14, 14, 14), lo, s)
    m = case_metrics(pred, gt, spacing, nsd_tolerance_mm=k * spacing[axis])
    assert m["dice"] == pytest.approx((s - k) / s)
    assert m["hd95"] == pytest.approx(k * spacing[axis])
    assert m["nsd"] == pytest.approx(1.0)
    assert case_metrics(pred, gt, spacing, nsd_tolerance_mm=k * spacing[axis] * 0.9)["nsd"] < 1


def test_nested_squares_exact_nsd_and_symmetry():
    # a 6x6 square inside a 10x10 one, 2 voxels from each side: every inner edge voxel is 2 mm from the outer edge
    outer, inner = box((14, 14), (2, 2), 10), box((14, 14), (4, 4), 6)
    m = case_metrics(inner, outer, (1.0, 1.0), nsd_tolerance_mm=1.5)
    assert m["dice"] == pytest.approx(2 * 36 / (36 + 100))
    # outer ring (36 voxels) to the inner one: 24 at 2 mm, 8 at sqrt(5), the 4 corners at sqrt(8) -> its 95th percentile is sqrt(8)
    assert m["hd95"] == pytest.approx(math.sqrt(8))
    assert m["nsd"] == pytest.approx(0.0)
    assert case_metrics(inner, outer, (1.0, 1.0), nsd_tolerance_mm=2.0)["nsd"] == pytest.approx((20 + 24) / (20 + 36))
    assert case_metrics(outer, inner, (1.0, 1.0), 2.0) == pytest.approx(case_metrics(inner, outer, (1.0, 1.0), 2.0))
    assert case_metrics(outer, outer, (0.5, 3.0)) == dict(dice=1.0, hd95=0.0, nsd=1.0)


def reference(pred, gt, spacing, tol):
    "Brute force: boundary = mask minus its face-connected erosion; nearest boundary distances by KD-tree in mm."
    def boundary_mm(m): return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)
    bp, bg = boundary_mm(pred), boundary_mm(gt)
    d_pg, d_gp = cKDTree(bg).query(bp)[0], cKDTree(bp).query(bg)[0]
    return dict(dice=2 * (pred & gt).sum() / (pred.sum() + gt.sum()),
                hd95=max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)),
                nsd=((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (len(d_pg) + len(d_gp)))


@pytest.mark.parametrize("shape,spacing", [((40, 36), (0.8, 1.3)), ((18, 20, 16), (2.0, 0.7, 1.1))])
def test_random_blobs_match_brute_force(shape, spacing):
    g = np.random.default_rng(0)
    for _ in range(3):
        blob = lambda: ndimage.gaussian_filter(g.standard_normal(shape), 2.0) > 0.05
        pred, gt = blob(), blob()
        got, ref = case_metrics(pred, gt, spacing, nsd_tolerance_mm=1.5), reference(pred, gt, spacing, 1.5)
        for k in ("dice", "hd95", "nsd"): assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


def test_per_class_on_a_multiclass_label_map():
    spacing = (2.0, 1.0, 1.0)
    gt = np.zeros((16, 16, 16), np.uint8)
    gt[box(gt.shape, (2, 2, 2), 5)] = 1
    gt[box(gt.shape, (9, 9, 9), 4)] = 2
    pred = np.zeros_like(gt)
    pred[box(gt.shape, (3, 2, 2), 5)] = 1      # class 1 one slice off along the 2 mm axis
    pred[gt == 2] = 2                           # class 2 perfect
    pred[box(gt.shape, (12, 1, 12), 2)] = 4     # class 4 hallucinated; class 3 absent in both
    out = class_metrics(pred, gt, spacing, {"liver": 1, "spleen": 2, "kidney": 3, "tumour": 4}, nsd_tolerance_mm=1.0)
    assert out["liver"]["dice"] == pytest.approx(4 / 5) and out["liver"]["hd95"] == pytest.approx(2.0)
    assert out["liver"]["nsd"] < 1
    assert out["spleen"] == dict(dice=1.0, hd95=0.0, nsd=1.0)
    assert out["kidney"] == dict(dice=1.0, hd95=0.0, nsd=1.0)
    assert (out["tumour"]["dice"], out["tumour"]["nsd"], math.isnan(out["tumour"]["hd95"])) == (0.0, 0.0, True)
    assert class_metrics(pred, gt, spacing, {"liver": 1}, nsd_tolerance_mm=2.0)["liver"]["nsd"] == pytest.approx(1.0)


def test_empty_conventions_and_input_types():
    z, m = np.zeros((8, 8, 8), bool), box((8, 8, 8), (2, 2, 2), 3)
    assert case_metrics(z, z, (1, 1, 1)) == dict(dice=1.0, hd95=0.0, nsd=1.0)
    for pred, gt in ((m, z), (z, m)):
        out = case_metrics(pred, gt, (1, 1, 1))
        assert out["dice"] == 0.0 and out["nsd"] == 0.0 and math.isnan(out["hd95"])
    # 0/1 integers and torch tensors are accepted as masks
    assert case_metrics(torch.from_numpy(m.astype(np.uint8)), m.astype(int), [1, 1, 1])["dice"] == 1.0


def test_bad_input_names_the_argument():
    m = box((8, 8), (2, 2), 3)
    with pytest.raises(AmalgamError, match="gt: expected a binary mask"): case_metrics(m, m * 2, (1, 1))
    with pytest.raises(AmalgamError, match="pred: shape"): case_metrics(m, m[:-1], (1, 1))
    with pytest.raises(AmalgamError, match="pred: expected a 2D or 3D mask"): case_metrics(m[0], m[0], (1,))
    with pytest.raises(AmalgamError, match="spacing: expected 2 positive numbers"): case_metrics(m, m, (1, 0))
    with pytest.raises(AmalgamError, match="spacing: expected 2"): case_metrics(m, m, "ab")
    with pytest.raises(AmalgamError, match="nsd_tolerance_mm"): case_metrics(m, m, (1, 1), nsd_tolerance_mm=-1)
    with pytest.raises(AmalgamError, match="classes: empty"): class_metrics(m, m, (1, 1), {})


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_contains_mean_is_seeded_and_counts_nan():
    v = np.random.default_rng(1).normal(0.8, 0.1, 40).tolist() + [float("nan"), None]
    ci = bootstrap_ci(v, seed=5)
    assert ci["lo"] < ci["mean"] < ci["hi"]
    assert (ci["n"], ci["n_nan"]) == (40, 2)
    assert ci["mean"] == pytest.approx(np.nanmean(np.array(v[:40])))
    assert bootstrap_ci(v, seed=5) == ci
    assert bootstrap_ci(v, seed=6) != ci
    assert bootstrap_ci(v, seed=5, alpha=0.5)["hi"] - bootstrap_ci(v, seed=5, alpha=0.5)["lo"] < ci["hi"] - ci["lo"]


def test_bootstrap_width_follows_the_standard_error():
    g = np.random.default_rng(2)
    base = g.standard_normal(300)
    widths = [(lambda c: c["hi"] - c["lo"])(bootstrap_ci(0.7 + sd * base)) for sd in (0.02, 0.1)]
    assert widths[1] > widths[0]
    assert widths[1] / widths[0] == pytest.approx(5, rel=0.1)     # the same resamples: width scales with the spread
    se = 0.1 * base.std(ddof=1) / np.sqrt(300)
    assert widths[1] == pytest.approx(2 * 1.96 * se, rel=0.15)   # close to the normal interval for a large sample


def test_bootstrap_edge_cases():
    one = bootstrap_ci([0.7])
    assert one["mean"] == one["lo"] == one["hi"] == pytest.approx(0.7) and one["n"] == 1
    none = bootstrap_ci([float("nan"), None])
    assert math.isnan(none["mean"]) and (none["n"], none["n_nan"]) == (0, 2)
    with pytest.raises(AmalgamError, match="infinite"): bootstrap_ci([1.0, -math.inf])
    with pytest.raises(AmalgamError, match="alpha"): bootstrap_ci([1.0], alpha=1.0)
    with pytest.raises(AmalgamError, match="n_boot"): bootstrap_ci([1.0], n_boot=0)


# ---------------------------------------------------------------- summaries and figure

def records(methods=("ka2er", "baseline"), modes=("box",), n=6):
    g = np.random.default_rng(3)
    out = []
    for meth in methods:
        for mode in modes:
            for task, classes in (("abdomen", ("liver", "spleen")), ("lung", ("nodule",))):
                for c in classes:
                    for i in range(n):
                        out.append({"method": meth, "mode": mode, "task": task, "class": c, "case_id": f"{task}_{i:03d}",
                                    "dice": float(g.uniform(0.6, 0.95)), "hd95": float("nan") if i == 0 else float(g.uniform(1, 9)),
                                    "nsd": float(g.uniform(0.5, 1))})
    return out


def test_summarize_groups_counts_and_is_stable_across_added_groups():
    recs = records()
    rows = summarize(recs, n_boot=500)
    assert [(r["method"], r["task"], r["class"]) for r in rows][:3] == [("ka2er", "abdomen", "liver"), ("ka2er", "abdomen", "spleen"), ("ka2er", "lung", "nodule")]
    assert len(rows) == 6 and all(r["n"] == 6 and r["hd95_n"] == 5 and r["hd95_n_nan"] == 1 and r["ci_level"] == 0.95 for r in rows)
    liver = [r["dice"] for r in recs if r["method"] == "ka2er" and r["class"] == "liver"]
    assert rows[0]["dice_mean"] == pytest.approx(np.mean(liver))
    assert all(r["dice_lo"] <= r["dice_mean"] <= r["dice_hi"] for r in rows)
    # a group's interval does not depend on which other groups are summarised
    alone = summarize([r for r in recs if r["method"] == "baseline"], n_boot=500)
    assert alone == rows[3:]
    by_method = summarize(recs, by=("method",), metrics=("dice",), n_boot=500)
    assert [r["n"] for r in by_method] == [18, 18] and "hd95_mean" not in by_method[0]


def test_summarize_bad_records():
    with pytest.raises(AmalgamError, match="records: empty"): summarize([])
    with pytest.raises(AmalgamError, match=r"records\[1\]: missing key\(s\) \['nsd'\]"):
        summarize([dict(method="a", mode="box", task="t", dice=1, hd95=0, nsd=1, **{"class": "c"}),
                   dict(method="a", mode="box", task="t", dice=1, hd95=0, **{"class": "c"})])
    with pytest.raises(AmalgamError, match="non-numeric"):
        summarize([dict(method="a", dice="good")], by=("method",), metrics=("dice",))


def test_per_class_table_and_figure():
    rows = summarize(records(), n_boot=200)
    tab = per_class_table(rows, "hd95", digits=1)
    assert [r["class"] for r in tab] == ["abdomen:liver", "abdomen:spleen", "lung:nodule"]
    r0 = rows[0]
    assert tab[0]["ka2er"] == f"{r0['hd95_mean']:.1f} [{r0['hd95_lo']:.1f}, {r0['hd95_hi']:.1f}]"
    fig = dice_ci_figure(rows)
    assert [t.name for t in fig.data] == ["ka2er", "baseline"]
    assert list(fig.data[1].x) == ["abdomen:liver", "abdomen:spleen", "lung:nodule"]
    np.testing.assert_allclose(fig.data[1].y, [r["dice_mean"] for r in rows[3:]])
    np.testing.assert_allclose(np.asarray(fig.data[1].y) + np.asarray(fig.data[1].error_y.array), [r["dice_hi"] for r in rows[3:]])
    np.testing.assert_allclose(np.asarray(fig.data[1].y) - np.asarray(fig.data[1].error_y.arrayminus), [r["dice_lo"] for r in rows[3:]])
    assert fig.layout.barmode == "group" and "95%" in fig.layout.title.text
    assert "mm" in dice_ci_figure(rows, "hd95").layout.yaxis.title.text
    fig.to_json()
    # several prompt modes: one bar per (method, mode)
    two_modes = summarize(records(modes=("box", "points")), n_boot=200)
    assert [t.name for t in dice_ci_figure(two_modes, "nsd").data] == ["ka2er (box)", "ka2er (points)", "baseline (box)", "baseline (points)"]
    with pytest.raises(AmalgamError, match="several rows"): dice_ci_figure(summarize(records(), by=("method", "task", "class", "case_id"), n_boot=10))
    with pytest.raises(AmalgamError, match="no 'hd95' columns"): dice_ci_figure(summarize(records(), metrics=("dice",), n_boot=10), "hd95")
