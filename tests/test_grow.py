"""`amalgam add-expert`: a tiny KA2ER trained on three phantom tasks grown by the fourth task's nnU-Net expert (as a
results folder and as an nnU-Net export zip), then used like any run; bad experts exit 2 with one line and no output."""
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from amalgam.cli import main
from amalgam.data import DataConfig, task_classes
from amalgam.experts import Expert, ExpertBank, save_model_folder, tiny_test_expert
from amalgam.losses import LossConfig
from amalgam.manifests import load_manifest, materialize, write_manifest
from amalgam.model import KA2ERConfig
from amalgam.phantoms import phantom_manifest
from amalgam.train import TrainConfig, load_run, read_run_config, train
from test_student import SMALL  # the tiny model size both tests train

TASKS = ("ct_abdomen", "ct_lung", "mr_brain", "mr_cardiac")


def saved_expert(manifest, folder, seed=0, dims=2, in_channels=1, plain=False):
    """A random tiny nnU-Net expert for `manifest`'s task and labels, saved as nnU-Net saves a trained model; `plain`:
    as plain `nnUNetv2_train` would (its dataset.json does not name an amalgam task)."""
    m = load_manifest(manifest)
    e = tiny_test_expert(dims, in_channels, num_classes=len(m.labels), name=m.task, seed=seed, modality=m.modality)
    dataset_json = {k: v for k, v in e.dataset_json.items() if not (plain and k == "amalgam_task")}
    e = Expert(e.network, e.plans, {**dataset_json, "labels": m.labels}, e.configuration, name=m.task)
    return save_model_folder(e, folder)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "KA2ER trained for 2 steps on the first three tasks; the fourth task's manifest and expert folder."
    tmp = tmp_path_factory.mktemp("grow")
    manifests = [write_manifest(phantom_manifest(t, n_cases=3, shape=(64, 64, 24)), tmp / f"{t}.yaml") for t in TASKS]
    for m in manifests: materialize(m, nnunet_raw=tmp / "raw", cache_dir=tmp / "cache")
    folders = [saved_expert(m, tmp / "experts" / t, seed=i) for i, (m, t) in enumerate(zip(manifests, TASKS))]
    bank = ExpertBank([Expert.from_folder(f, fold=0, name=t) for f, t in zip(folders[:3], TASKS)])
    train(tmp / "run", manifests[:3], KA2ERConfig(**SMALL, tasks=task_classes(manifests[:3])),
          DataConfig(spatial_dims=2, patch_size=(64, 64), batch_size=2), TrainConfig(steps=2, warmup_steps=1),
          LossConfig(), bank, root=tmp / "raw", progress=False,
          expert_sources=[{"name": e.name, "task": e.task, "folder": str(f), "fold": 0, "labels": dict(e.labels)}
                          for e, f in zip(bank, folders)])
    return {"tmp": tmp, "run": tmp / "run", "manifest": manifests[3], "expert": folders[3], "raw": tmp / "raw"}


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
