"""Bundles (issue 12, part 1): `amalgam export` packs a run; `amalgam predict -m` uses it on another machine with no other
file; a damaged or hostile bundle is refused with one line, exit code 2 and nothing written."""
import gzip
import hashlib
import io
import json
import shutil
import stat
import zipfile

import pytest
import torch

from amalgam.bundles import BUNDLE_INDEX
from amalgam.cli import main
from amalgam.segmenter import Segmenter
from test_bad_inputs import check_one_line, run, tree
from test_infer import make_run
from test_predict_cli import volume, write_nii


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("AMALGAM_WORKSPACE", str(tmp_path / "ws"))


def exported(d):
    "A tiny 2D run, exported with `amalgam export`; the zip, and the masks the run itself predicts on one volume."
    run_dir = make_run(d / "train_machine" / "run", 2, (64, 64))
    image = write_nii(d / "case.nii.gz", volume((40, 36, 6)))
    prompts = d / "prompts.json"
    prompts.write_text(json.dumps({"box": [[8, 6, 1], [30, 28, 4]], "points": [[18, 16, 2]]}))
    assert main(["predict", "-r", str(run_dir), "-i", str(image), "-o", str(d / "from_run"), "--prompts", str(prompts),
                 "--save-probabilities"]) == 0
    assert main(["export", str(run_dir), str(d / "model.zip")]) == 0
    return {"dir": d, "zip": d / "model.zip", "image": image, "prompts": prompts, "train_machine": d / "train_machine"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("bundle"))


def nifti_bytes(path):
    "The NIfTI bytes inside a .nii.gz (the gzip header carries a time stamp, the image does not)."
    return gzip.decompress(path.read_bytes())


def test_export_move_delete_predict_gives_the_same_masks(tmp_path):
    bundle = exported(tmp_path / "server")
    moved = tmp_path / "laptop" / "model.zip"
    moved.parent.mkdir(); shutil.copy(bundle["zip"], moved)
    shutil.rmtree(bundle["train_machine"])  # the run, its config's expert folder: gone
    out = tmp_path / "masks"
    assert main(["predict", "-m", str(moved), "-i", str(bundle["image"]), "-o", str(out), "--prompts",
                 str(bundle["prompts"]), "--save-probabilities"]) == 0
    for name in ("case.nii.gz", "case_probability.nii.gz"):
        assert nifti_bytes(out / name) == nifti_bytes(bundle["dir"] / "from_run" / name), name
    unpacked = list((tmp_path / "ws" / "bundles").iterdir())
    assert len(unpacked) == 1 and (unpacked[0] / "run" / "model.pt").is_file()
    seg = Segmenter.from_bundle(moved)  # the Python API: the same model, the unpacked folder reused
    assert seg.tasks == {"demo": ["ball", "cube"]} and len(list((tmp_path / "ws" / "bundles").iterdir())) == 1
    with zipfile.ZipFile(moved) as z:
        card = json.loads(z.read("model_card.json"))
        assert torch.load(io.BytesIO(z.read("run/model.pt")), weights_only=True).keys() == {"model", "step"}
    assert card["kind"] == "ka2er" and card["experts"][0]["name"] == "demo" and card["packages"]["torch"]


REG = stat.S_IFREG | 0o644


def rezip(src, dst, edit):
    "A copy of the bundle `src` with `edit(name, bytes) -> [(name, bytes, mode)]` applied to every member."
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for n in zi.namelist():
            for name, blob, mode in edit(n, zi.read(n)):
                info = zipfile.ZipInfo(name); info.external_attr = mode << 16; zo.writestr(info, blob)
    return dst


def b_altered(src, tmp):
    edit = lambda n, b: [(n, b + b" " if n == "run/config.json" else b, REG)]
    return rezip(src, tmp / "altered.zip", edit), ["altered.zip", "run/config.json", "sha256"]


def b_truncated(src, tmp):
    (tmp / "truncated.zip").write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    return tmp / "truncated.zip", ["truncated.zip", "not a readable zip"]


def b_escape(src, tmp):
    edit = lambda n, b: [(n, b, REG)] + ([("../x", b"written outside", REG)] if n == BUNDLE_INDEX else [])
    return rezip(src, tmp / "escape.zip", edit), ["escape.zip", "'../x'", "outside"]


def b_symlink(src, tmp):
    edit = lambda n, b: [(n, b"/etc/passwd", stat.S_IFLNK | 0o777)] if n == "MODEL_CARD.md" else [(n, b, REG)]
    return rezip(src, tmp / "link.zip", edit), ["link.zip", "MODEL_CARD.md", "symlink"]


class Payload:
    "What a hostile checkpoint carries: unpickling it would call `print`."
    def __reduce__(self): return (print, ("pickle ran",))


def b_pickle(src, tmp):
    buf = io.BytesIO(); torch.save({"model": Payload(), "step": 0}, buf)
    def edit(n, b):
        if n == "run/model.pt": return [(n, buf.getvalue(), REG)]
        if n == BUNDLE_INDEX:  # listed with its true sha256: only the weights-only load can catch it
            index = json.loads(b); index["members"]["run/model.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
            return [(n, json.dumps(index).encode(), REG)]
        return [(n, b, REG)]
    return rezip(src, tmp / "pickled.zip", edit), ["pickled.zip", "run/model.pt", "pickle"]


def b_not_a_bundle(src, tmp):
    with zipfile.ZipFile(tmp / "other.zip", "w") as z: z.writestr("notes.txt", "hello")
    return tmp / "other.zip", ["other.zip", "not an amalgam bundle"]


@pytest.mark.parametrize("make", [b_altered, b_truncated, b_escape, b_symlink, b_pickle, b_not_a_bundle],
                         ids=lambda f: f.__name__[2:])
def test_bad_bundles_are_refused(bundle, make, tmp_path, capsys):
    bad, words = make(bundle["zip"], tmp_path)
    before = tree(tmp_path)
    rc = main([str(a) for a in ["predict", "-m", bad, "-i", bundle["image"], "-o", tmp_path / "out", "--auto",
                                "--task", "demo:ball"]])
    out, err = capsys.readouterr()
    check_one_line(rc, err.replace(str(tmp_path), "<tmp>"), 2, words)
    assert "pickle ran" not in out + err
    assert tree(tmp_path) == before  # no output folder, nothing unpacked into the workspace


def test_export_refuses_to_replace_a_file_it_did_not_write(bundle, tmp_path, capsys):
    notes = tmp_path / "notes.zip"; notes.write_text("a user's file")
    rc, err = run(["export", bundle["dir"] / "missing_run", tmp_path / "m.zip"], capsys, tmp_path)
    check_one_line(rc, err, 2, ["missing_run", "config.json"])
    rc, err = run(["export", bundle["dir"] / "train_machine" / "run", notes, "--overwrite"], capsys, tmp_path)
    check_one_line(rc, err, 2, ["notes.zip", "only an amalgam bundle"])
    assert notes.read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.zip"]
