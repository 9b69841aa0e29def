"""amalgam.widgets without a browser: the prompt state (slice <-> volume coordinates on every axis, visibility, boxes from drag
corners, undo/clear), saving masks as NIfTI on the image's affine, and the widget's wiring driven through the same messages the
browser sends (plotly click and relayout events, button clicks) with a recording stand-in segmenter."""
import itertools
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from amalgam.config import AmalgamError
from amalgam.data import tensor_affine
from amalgam.segmenter import voxel_to_world
from amalgam.widgets import PromptSegmenter, PromptState, save_mask

SHAPE = (5, 6, 7)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_and_volume_coordinates_round_trip(axis):
    s = PromptState(SHAPE)
    rows, cols = s.slice_shape(axis)
    assert (rows, cols) == tuple(n for i, n in enumerate(SHAPE) if i != axis)
    seen = set()
    for index, row, col in itertools.product(range(SHAPE[axis]), range(rows), range(cols)):
        voxel = s.slice_to_volume(axis, index, row, col)
        assert voxel[axis] == index and s.volume_to_slice(axis, voxel) == (index, row, col)
        seen.add(voxel)
    assert seen == set(itertools.product(*map(range, SHAPE)))  # every voxel, once


def test_clicks_go_to_the_nearest_pixel_and_must_hit_the_slice():
    s = PromptState(SHAPE)
    assert s.slice_to_volume(1, 2, 3.4, 5.6) == (3, 2, 6)
    assert s.slice_to_volume(2, 6, -0.4, 5.49) == (0, 5, 6)
    with pytest.raises(AmalgamError, match="outside the 6 x 7 slice"): s.slice_to_volume(0, 0, 5.6, 0)
    with pytest.raises(AmalgamError, match="outside the 5 x 6 slice"): s.slice_to_volume(2, 0, 0, -0.6)
    with pytest.raises(AmalgamError, match="slice 6 on axis 1"): s.slice_to_volume(1, 6, 0, 0)
    with pytest.raises(AmalgamError, match="axis -1"): s.slice_shape(-1)
    with pytest.raises(AmalgamError, match="outside the volume"): s.volume_to_slice(0, (5, 0, 0))
    with pytest.raises(AmalgamError, match="3 positive spatial sizes"): PromptState((4, 0, 3))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_points_show_on_their_own_slice_only(axis):
    s = PromptState(SHAPE)
    a = s.add_point(axis, 1, 2, 3)
    b = s.add_point(axis, 3, 0, 4, positive=False)
    assert s.labels == [1, 0] and s.points == [a, b]
    assert s.points_on_slice(axis, 1) == [(2, 3, 1)] and s.points_on_slice(axis, 3) == [(0, 4, 0)]
    assert s.points_on_slice(axis, 2) == []
    other = (axis + 1) % 3  # seen along another axis, a point is on the slice through its coordinate on that axis
    seen = (*s.volume_to_slice(other, a)[1:], 1)
    assert [i for i in range(SHAPE[other]) if seen in s.points_on_slice(other, i)] == [a[other]]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_from_drag_corners(axis):
    s = PromptState(SHAPE)
    rows, cols = s.slice_shape(axis)
    for corner, other in [((1, 2), (3.2, 4.6)), ((3.2, 4.6), (1, 2)), ((3, 2), (1, 5)), ((1, 5), (3, 2))]:  # any drag direction
        box = s.set_box(axis, 2, corner, other)
        lo, hi = [1, 2], [3, 5]
        lo.insert(axis, 2); hi.insert(axis, 2)
        assert box == (tuple(lo), tuple(hi)) == s.box
    assert s.box_on_slice(axis, 2) == (1, 2, 3, 5) and s.box_on_slice(axis, 1) is None
    # a drag past the slice's edges is clipped; depth reaches slices either side, clipped to the volume
    lo, hi = s.set_box(axis, 1, (-3, -1), (rows + 4, cols + 9), depth=2)
    assert lo[axis] == 0 and hi[axis] == 3 and [v for i, v in enumerate(lo) if i != axis] == [0, 0]
    assert [v for i, v in enumerate(hi) if i != axis] == [rows - 1, cols - 1]
    assert s.box_on_slice(axis, 3) == (0, 0, rows - 1, cols - 1) and s.box_on_slice(axis, 4) is None
    # seen along another axis, the box is a rectangle on every slice it crosses
    other = (axis + 1) % 3
    assert all(s.box_on_slice(other, i) is not None for i in range(lo[other], hi[other] + 1))
    with pytest.raises(AmalgamError, match="depth -1"): s.set_box(axis, 0, (0, 0), (1, 1), depth=-1)


def test_undo_and_clear():
    s = PromptState(SHAPE)
    assert not s.undo() and s.empty
    s.add_point(0, 0, 1, 1)
    s.set_box(0, 0, (0, 0), (2, 2))
    s.add_point(0, 1, 2, 2, positive=False)
    s.task = "ct_abdomen:liver"
    s.clear()
    assert s.empty and s.task == "ct_abdomen:liver"  # clear keeps the task
    s.clear()  # clearing nothing adds no history
    assert s.undo() and len(s.points) == 2 and s.box is not None
    assert s.undo() and s.points == [(0, 1, 1)] and s.box is not None
    assert s.undo() and s.box is None and s.points == [(0, 1, 1)]
    assert s.undo() and s.empty and not s.undo()


def test_segment_kwargs():
    s = PromptState(SHAPE)
    with pytest.raises(AmalgamError, match="none placed"): s.segment_kwargs()
    s.task = "ct_abdomen:liver"
    assert s.segment_kwargs() == dict(points=None, point_labels=None, box=None, task="ct_abdomen:liver")
    s.task = None
    s.add_point(2, 6, 4, 5); s.add_point(0, 1, 2, 3, positive=False); s.set_box(1, 3, (0, 0), (4, 6))
    kw = s.segment_kwargs()
    assert kw["points"].dtype == np.float32 and kw["points"].tolist() == [[4, 5, 6], [1, 2, 3]]
    assert kw["point_labels"].dtype == np.int64 and kw["point_labels"].tolist() == [1, 0]
    assert kw["box"].dtype == np.float32 and kw["box"].tolist() == [[0, 3, 0], [4, 3, 6]] and kw["task"] is None
    assert "1 positive, 1 negative" in s.describe() and "box (0, 3, 0)–(4, 3, 6)" in s.describe()


def oblique_affine():
    "A nibabel affine with a rotation, anisotropic spacing and an offset, so any axis mix-up moves voxels in world space."
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.eye(4)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.9, 2.5])
    a[:3, 3] = [-20, 13, 7]
    return a


@pytest.mark.parametrize("name", ["mask.nii.gz", "sub/dir/mask.nii"])
def test_saved_mask_lands_on_the_image(tmp_path, name):
    nifti_affine = oblique_affine()
    mask = np.zeros((SHAPE[2], SHAPE[1], SHAPE[0]), bool)  # tensor axis order of an image whose file array is SHAPE
    mask[1, 2, 3] = mask[4, 0, 1] = True
    path = save_mask(mask, tmp_path / name, tensor_affine(nifti_affine))
    img = nib.load(path)
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.affine, nifti_affine, atol=1e-5)
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)  # file order (x, y, z)
    world_saved = nib.affines.apply_affine(img.affine, ijk)
    world_mask = voxel_to_world(np.argwhere(mask), tensor_affine(nifti_affine))
    assert sorted(map(tuple, np.round(world_saved, 4))) == sorted(map(tuple, np.round(world_mask, 4)))
    assert not list(tmp_path.rglob(".mask*"))  # no temporary file left behind


def test_save_mask_bad_input(tmp_path):
    with pytest.raises(AmalgamError, match="end in .nii or .nii.gz"): save_mask(np.zeros((2, 2, 2)), tmp_path / "m.npy")
    with pytest.raises(AmalgamError, match="expected a 3D array"): save_mask(np.zeros((2, 2)), tmp_path / "m.nii")
    with pytest.raises(AmalgamError, match="4 x 4"): save_mask(np.zeros((2, 2, 2)), tmp_path / "m.nii", np.eye(3))


class RecordingSegmenter:
    "Stand-in with `Segmenter.segment`'s signature: records each call; the mask is a 3x3x3 cube around each positive point or the box."
    tasks = {"ct_abdomen": ["liver", "spleen"], "ct_lung": ["nodule"]}

    def __init__(self): self.calls = []

    def segment(self, image, points=None, point_labels=None, box=None, task=None, return_probability=False,
                return_weights=False, progress=False):
        self.calls.append(dict(shape=image.shape, points=points, point_labels=point_labels, box=box, task=task,
                               return_weights=return_weights))
        mask = np.zeros(image.shape[1:], np.uint8)
        for p, label in zip(points if points is not None else [], point_labels if point_labels is not None else []):
            if label == 1: mask[tuple(slice(max(int(v) - 1, 0), int(v) + 2) for v in p)] = 1
        if box is not None: mask[tuple(slice(int(a), int(b) + 1) for a, b in zip(*box))] = 1
        if points is None and box is None: mask[:] = 1
        ramp = np.linspace(0, 1, mask.size, dtype=np.float32).reshape(mask.shape)
        return SimpleNamespace(mask=mask, probability=None,
                               expert_weights={"ct_abdomen": ramp, "foundation": 1 - ramp} if return_weights else None)


def make_widget(**kw):
    image = np.random.default_rng(0).normal(100, 30, size=(1, 8, 9, 10)).astype(np.float32)
    return PromptSegmenter(RecordingSegmenter(), image, affine=tensor_affine(np.diag([0.5, 1.0, 2.0, 1.0])), **kw)


def browser_click(ps, row, col):
    "The message plotly's front end sends for a click on pixel (row, col) of the image heatmap (trace 0)."
    ps.figure._js2py_pointsCallback = {"event_type": "plotly_click", "points": {
        "trace_indexes": [0], "point_indexes": [[row, col]], "xs": [col], "ys": [row]}, "device_state": None, "selector": None}


def browser_drag(ps, x0, y0, x1, y1):
    "The relayout plotly's front end sends when a box is dragged in select mode over a figure of heatmaps."
    ps.figure._js2py_relayout = {"relayout_data": {"selections": [
        {"type": "rect", "xref": "x", "yref": "y", "x0": x0, "y0": y0, "x1": x1, "y1": y1}]}, "source_view_id": "view"}


def readout(ps): return ps.readout.value.replace("<br>", "\n")


def test_widget_click_run_and_overlay():
    ps = make_widget()
    assert (ps.axis, ps.index) == (0, 4) and "mask: none yet" in readout(ps)
    assert ps.figure.data[0].z.shape == (9, 10) and np.array_equal(ps.figure.data[0].z, ps.image[0, 4])
    browser_click(ps, 3, 7)
    assert ps.state.points == [(4, 3, 7)] and "last point (voxel): (4, 3, 7)" in readout(ps)
    assert (list(ps.figure.data[2].x), list(ps.figure.data[2].y)) == ([7], [3])  # the green marker at the click
    ps.mode.value = "negative point"
    browser_click(ps, 5, 1)
    assert ps.state.labels == [1, 0] and (list(ps.figure.data[3].x), list(ps.figure.data[3].y)) == ([1], [5])
    ps.run_button.click()
    call = ps.segmenter.calls[-1]
    assert call["shape"] == (1, 8, 9, 10) and call["return_weights"] and call["task"] is None and call["box"] is None
    assert call["points"].tolist() == [[4, 3, 7], [4, 5, 1]] and call["point_labels"].tolist() == [1, 0]
    assert "mask: 27 voxels (0.03 mL)" in readout(ps)  # 27 voxels of 0.5 x 1 x 2 mm
    assert ps.figure.data[1].z.sum() == 9 and ps.figure.data[1].z[2:5, 6:9].all()  # the cube's cut through slice 4
    assert list(ps.expert.options) == ["ct_abdomen", "foundation"] and ps.expert.value == "ct_abdomen"
    np.testing.assert_array_equal(ps.weights_figure.data[0].z, ps.result.expert_weights["ct_abdomen"][4])
    ps.expert.value = "foundation"
    np.testing.assert_array_equal(ps.weights_figure.data[0].z, ps.result.expert_weights["foundation"][4])
    ps.show_mask.value = False
    assert ps.figure.data[1].z.sum() == 0


def test_widget_views_follow_axis_slice_and_window():
    ps = make_widget()
    ps.add_point(0, 4, 3, 7)
    ps.axis_buttons.value = 2
    assert (ps.axis, ps.index, ps.slice_slider.max, ps.slice_slider.value) == (2, 5, 9, 5)
    assert np.array_equal(ps.figure.data[0].z, ps.image[0, :, :, 5]) and list(ps.figure.data[2].x) == []  # the point is on x = 7
    ps.slice_slider.value = 7
    assert np.array_equal(ps.figure.data[0].z, ps.image[0, :, :, 7]) and (list(ps.figure.data[2].x), list(ps.figure.data[2].y)) == ([3], [4])
    assert tuple(ps.figure.layout.xaxis.range) == (-0.5, 8.5) and tuple(ps.figure.layout.yaxis.range) == (7.5, -0.5)
    ps.level.value, ps.width.value = 90.0, 40.0
    assert (ps.figure.data[0].zmin, ps.figure.data[0].zmax) == (70.0, 110.0)
    ps.show(axis=1, index=2)
    assert (ps.axis_buttons.value, ps.slice_slider.value, ps.slice_slider.max) == (1, 2, 8)
    with pytest.raises(AmalgamError, match="slice 9 on axis 1"): ps.show(index=9)


def test_widget_channels_have_their_own_window():
    image = np.stack([np.random.default_rng(0).normal(0, 1, (4, 5, 6)), np.random.default_rng(1).normal(1000, 300, (4, 5, 6))])
    ps = PromptSegmenter(RecordingSegmenter(), image)
    lo, hi = np.percentile(image[0], [0.5, 99.5])
    assert ps.level.value == pytest.approx((lo + hi) / 2) and ps.width.value == pytest.approx(hi - lo)
    ps.channel.value = 1
    lo, hi = np.percentile(image[1], [0.5, 99.5])
    assert ps.level.value == pytest.approx((lo + hi) / 2) and ps.width.value == pytest.approx(hi - lo)
    assert (ps.level.min, ps.level.max) == pytest.approx((image[1].min(), image[1].max()))
    np.testing.assert_array_equal(ps.figure.data[0].z, image[1, 2].astype(np.float32))
    assert ps.figure.data[0].zmin == pytest.approx(lo) and ps.figure.data[0].zmax == pytest.approx(hi)


def test_widget_box_drag_task_and_automatic_mode():
    ps = make_widget(axis=1, index=3)
    browser_drag(ps, 1.2, 0.7, 4.0, 2.0)  # in point mode a drag places nothing
    assert ps.state.box is None and ps.figure.layout.selections == ()
    ps.mode.value = "box"
    assert ps.figure.layout.dragmode == "select"
    browser_click(ps, 1, 1)  # in box mode a click places nothing
    assert ps.state.points == []
    ps.depth.value = 1
    browser_drag(ps, 4.3, 6.8, 1.2, 0.6)
    assert ps.state.box == ((1, 2, 1), (7, 4, 4)) and ps.figure.layout.selections == ()  # the drag outline is replaced by the box
    rect = ps.figure.layout.shapes[0]
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (0.5, 4.5, 0.5, 7.5)
    ps.task.value = "ct_abdomen:spleen"
    ps.run()
    assert ps.segmenter.calls[-1]["box"].tolist() == [[1, 2, 1], [7, 4, 4]] and ps.segmenter.calls[-1]["task"] == "ct_abdomen:spleen"
    assert int(ps.result.mask.sum()) == 7 * 3 * 4
    ps.undo_button.click()
    assert ps.state.empty and ps.result is not None  # undo takes back prompts; the last mask stays until the next run
    ps.run()
    assert ps.segmenter.calls[-1]["points"] is None and ps.segmenter.calls[-1]["box"] is None  # automatic mode: the task alone
    assert "mask: 720 voxels" in readout(ps)
    ps.clear_button.click()
    assert ps.result is None and "mask: none yet" in readout(ps) and ps.state.task == "ct_abdomen:spleen"
    assert [o[1] for o in ps.task.options] == [None, "ct_abdomen:liver", "ct_abdomen:spleen", "ct_lung:nodule"]


def test_widget_errors_show_in_the_readout(tmp_path):
    ps = make_widget(mask_path=tmp_path / "m.nii.gz")
    ps.run_button.click()  # nothing placed
    assert "error: prompts: none placed" in readout(ps) and not ps.segmenter.calls
    ps.save_button.click()
    assert "no mask to save yet" in readout(ps) and not (tmp_path / "m.nii.gz").exists()
    ps.undo_button.click()
    assert "nothing to undo" in readout(ps)
    ps.add_point(0, 4, 3, 3)
    assert "error" not in readout(ps) and "nothing to undo" not in readout(ps)
    with pytest.raises(AmalgamError, match="none placed"): make_widget().run()
    ps.segmenter.segment = lambda *a, **k: 1 / 0  # a bug in the model shows too, instead of vanishing in the widget's callback
    ps.run_button.click()
    assert "error: ZeroDivisionError: division by zero" in readout(ps)


def test_widget_save_button_writes_the_mask_on_the_image_affine(tmp_path):
    ps = make_widget(mask_path=tmp_path / "out" / "m.nii.gz")
    ps.add_point(0, 4, 3, 7)
    ps.run_button.click()
    ps.save_button.click()
    img = nib.load(tmp_path / "out" / "m.nii.gz")
    np.testing.assert_allclose(img.affine, np.diag([0.5, 1.0, 2.0, 1.0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), ps.result.mask)
    assert f"saved: {tmp_path / 'out' / 'm.nii.gz'}" in readout(ps)


def test_widget_bad_input():
    seg = RecordingSegmenter()
    with pytest.raises(AmalgamError, match="C x D x H x W"): PromptSegmenter(seg, np.zeros((8, 9, 10)))
    with pytest.raises(AmalgamError, match="affine"): PromptSegmenter(seg, np.zeros((1, 8, 9, 10)), affine=np.eye(3))
    with pytest.raises(AmalgamError, match="slice 8 on axis 0"): PromptSegmenter(seg, np.zeros((1, 8, 9, 10)), index=8)
    ps = make_widget()
    ps.segmenter.segment = lambda *a, **k: SimpleNamespace(mask=np.zeros((2, 2, 2), np.uint8), expert_weights=None)
    ps.add_point(0, 1, 1, 1)
    with pytest.raises(AmalgamError, match="mask of shape"): ps.run()
    assert ps.result is None
