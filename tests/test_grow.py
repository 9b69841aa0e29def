"""`amalgam add-expert`: a tiny KA2ER trained on three phantom tasks grown by the fourth task's nnU-Net expert (as a
results folder and as an nnU-Net export zip), then used like any run; bad experts exit 2 with one line and no output."""
import zipfile

import nibabel as nib
import numpy as np
import pytest

from amalgam.cli import main
from amalgam.manifests import load_manifest
from amalgam.run import load_run, read_run_config
from tiny_runs import saved_expert, tiny_ka2er_run

TASKS = ("ct_abdomen", "ct_lung", "mr_brain", "mr_cardiac")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "KA2ER trained for 2 steps on the first three tasks; the fourth task's manifest and expert folder."
    tmp = tmp_path_factory.mktemp("grow")
    run = tiny_ka2er_run(tmp, TASKS, trained=3)
    return {"tmp": tmp, "run": run["run"], "manifest": run["manifests"][3], "expert": run["experts"][3],
            "raw": run["raw"]}


def test_fourth_expert_from_a_folder_and_from_an_nnunet_zip(bench, tmp_path, capsys):
    plain = saved_expert(bench["manifest"], tmp_path / "plain", plain=True)
    zipped = tmp_path / "expert.zip"  # nnUNetv2_export_model_to_zip's layout: Dataset/Trainer__Plans__conf/...
    with zipfile.ZipFile(zipped, "w") as z:
        for p in plain.rglob("*"):
            if p.is_file(): z.write(p, f"Dataset504_X/nnUNetTrainer__nnUNetPlans__2d/{p.relative_to(plain)}")
    for name, expert in (("folder", bench["expert"]), ("zip", zipped)):
        out = tmp_path / f"grown_{name}"
        rc = main(["add-expert", str(bench["run"]), str(out), "--expert", str(expert), "--manifest",
                   str(bench["manifest"]), "--steps", "1", "--nnunet-raw", str(bench["raw"])])
        assert rc == 0, capsys.readouterr().err
        cfg = read_run_config(out)
        assert sorted(s["name"] for s in cfg["experts"]) == sorted(TASKS) and "mr_cardiac" in cfg["model"]["tasks"]
        assert cfg["init"]["added_expert"] == "mr_cardiac" and cfg["init"]["fresh_tensors"] > 0
        experts = load_run(out).experts  # the plain model serves the manifest's task, in training and after
        assert sorted(experts.names) == sorted(TASKS) and experts["mr_cardiac"].task == "mr_cardiac"
    src = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(300, 80, (64, 64, 2)).astype(np.float32), np.eye(4)), src)
    assert main(["predict", "-r", str(tmp_path / "grown_folder"), "-i", str(src), "-o", str(tmp_path / "o"),
                 "--auto", "--task", "mr_cardiac"]) == 0, capsys.readouterr().err
    values = set(np.unique(np.asarray(nib.load(tmp_path / "o" / "c.nii.gz").dataobj)))
    assert values <= set(load_manifest(bench["manifest"]).labels.values())


def test_bad_experts_exit_2_and_write_nothing(bench, tmp_path, capsys):
    tmp = bench["tmp"]
    cases = {"3D expert": (saved_expert(bench["manifest"], tmp_path / "e3", dims=3), [], "is 3D, the model's 2D"),
             "two channels": (saved_expert(bench["manifest"], tmp_path / "e2", in_channels=2), [],
                              "takes input channels 2, the model's 1"),
             "no such fold": (bench["expert"], ["--fold", "2"], "fold_2"),
             "known task": (bench["expert"], [], "already one of the run's tasks")}
    for name, (expert, extra, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        manifest = tmp / "ct_lung.yaml" if name == "known task" else bench["manifest"]
        rc = main(["add-expert", str(bench["run"]), str(out), "--expert", str(expert), "--manifest", str(manifest),
                   "--nnunet-raw", str(bench["raw"]), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (name, err)
        assert not out.exists(), name
