"""`amalgam distill`: a tiny KA2ER teacher distilled into an expert-free student that is then exported and used like any
other model (bundle + predict); bad teachers exit 2 with one line on stderr and no student folder."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from amalgam.cli import main
from amalgam.config import sha256_file
from amalgam.manifests import write_manifest
from amalgam.phantoms import phantom_manifest
from amalgam.run import read_run_config
from tiny_runs import tiny_ka2er_run


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    "A 2-step KA2ER run on one phantom task, its expert saved as an nnU-Net folder: (run folder, nnUNet_raw)."
    run = tiny_ka2er_run(tmp_path_factory.mktemp("teacher"), ["ct_lung"])
    return run["run"], run["raw"]


def test_distilled_student_is_exported_and_predicts(tmp_path, teacher, capsys):
    run, raw = teacher
    student = tmp_path / "student"
    argv = ["distill", str(run), str(student), "--steps", "2", "--kd-weight", "1.0", "--nnunet-raw", str(raw)]
    assert main(argv) == 0
    assert "student of" in capsys.readouterr().out
    cfg = read_run_config(student)
    assert cfg["experts"] == [] and cfg["loss"]["kd_weight"] == 1.0 and cfg["train"]["steps"] == 2
    assert cfg["teacher_run"]["model_sha256"] == sha256_file(run / "model.pt")
    assert all(json.loads(l)["kd"] > 0 for l in (student / "metrics.jsonl").read_text().splitlines())
    assert main(["export", str(student), str(tmp_path / "student.zip")]) == 0
    card = json.loads(__import__("zipfile").ZipFile(tmp_path / "student.zip").read("model_card.json"))
    assert card["kind"] == "baseline (no experts)" and card["experts"] == []
    src = tmp_path / "c.nii.gz"
    scan = np.random.default_rng(0).normal(-500, 300, (64, 64, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), src)
    shutil.rmtree(student)  # the bundle alone
    assert main(["predict", "-m", str(tmp_path / "student.zip"), "-i", str(src), "-o", str(tmp_path / "out"),
                 "--auto", "--task", "ct_lung"]) == 0, capsys.readouterr().err
    assert nib.load(tmp_path / "out" / "c.nii.gz").shape == (64, 64, 3)


def test_bad_teachers_exit_2_and_write_nothing(tmp_path, teacher, capsys):
    run, raw = teacher
    baseline = tmp_path / "baseline"
    shutil.copytree(run, baseline)
    cfg = json.loads((baseline / "config.json").read_text())
    (baseline / "config.json").write_text(json.dumps({**cfg, "experts": []}))
    cases = {"no experts": ([str(baseline)], "has nothing to distil"),
             "not a run": ([str(tmp_path)], "not a training run folder"),
             "kd 0": ([str(run), "--kd-weight", "0"], "distils nothing"),
             "foreign manifest": ([str(run), "--manifests", str(tmp_path / "m.yaml")], "changed or foreign")}
    write_manifest(phantom_manifest("ct_abdomen", n_cases=3, shape=(64, 64, 24)), tmp_path / "m.yaml")
    for name, (args, message) in cases.items():
        out = tmp_path / f"s_{name.replace(' ', '_')}"
        assert main(["distill", args[0], str(out), *args[1:], "--nnunet-raw", str(raw)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists(), name
    other = tmp_path / "other_run"  # --restart starts a student over, never another run
    shutil.copytree(run, other)
    before = {p.name: sha256_file(p) for p in other.rglob("*") if p.is_file()}
    assert main(["distill", str(run), str(other), "--restart", "--nnunet-raw", str(raw)]) == 2
    err = capsys.readouterr().err
    assert "starting over would replace it" in err and err.count("\n") == 1, err
    assert {p.name: sha256_file(p) for p in other.rglob("*") if p.is_file()} == before
