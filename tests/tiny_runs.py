"""The tiny trained KA2ER that the student and add-expert tests start from: phantom manifests, a random tiny nnU-Net
expert per task saved as nnU-Net saves a trained model, and a KA2ER trained for a few steps on some of the tasks."""
from pathlib import Path

from amalgam.data import DataConfig, task_classes
from amalgam.experts import Expert, ExpertBank, save_model_folder
from amalgam.losses import LossConfig
from amalgam.manifests import load_manifest, materialize, write_manifest
from amalgam.model import KA2ERConfig
from amalgam.phantoms import phantom_manifest
from amalgam.train import TrainConfig, train
from tiny_experts import tiny_test_expert

SMALL = dict(spatial_dims=2, feature_size=12, hidden_dim=32, transformer_dim=32, iou_head_hidden_dim=32,
             mask_in_chans=8)


def saved_expert(manifest, folder, seed=0, dims=2, in_channels=1, plain=False) -> Path:
    """A random tiny nnU-Net expert for `manifest`'s task and labels, saved as nnU-Net saves a trained model; `plain`:
    as plain `nnUNetv2_train` would (its dataset.json does not name an amalgam task)."""
    m = load_manifest(manifest)
    e = tiny_test_expert(dims, in_channels, num_classes=len(m.labels), name=m.task, seed=seed, modality=m.modality)
    dataset_json = {k: v for k, v in e.dataset_json.items() if not (plain and k == "amalgam_task")}
    e = Expert(e.network, e.plans, {**dataset_json, "labels": m.labels}, e.configuration, name=m.task)
    return save_model_folder(e, folder)


def tiny_ka2er_run(tmp: Path, tasks, trained: int | None = None, steps: int = 2) -> dict:
    """In `tmp`: a manifest and a saved expert per task of `tasks`, and a KA2ER run (`tmp/run`) trained for `steps` on
    the first `trained` tasks (default all). Returns the run, nnUNet_raw, manifests and expert folders."""
    trained = len(tasks) if trained is None else trained
    manifests = [write_manifest(phantom_manifest(t, n_cases=3, shape=(64, 64, 24)), tmp / f"{t}.yaml") for t in tasks]
    for m in manifests: materialize(m, nnunet_raw=tmp / "raw", cache_dir=tmp / "cache")
    folders = [saved_expert(m, tmp / "experts" / t, seed=i) for i, (m, t) in enumerate(zip(manifests, tasks))]
    bank = ExpertBank([Expert.from_folder(f, fold=0, name=t) for f, t in zip(folders[:trained], tasks)])
    train(tmp / "run", manifests[:trained], KA2ERConfig(**SMALL, tasks=task_classes(manifests[:trained])),
          DataConfig(spatial_dims=2, patch_size=(64, 64), batch_size=2), TrainConfig(steps=steps, warmup_steps=1),
          LossConfig(), bank, root=tmp / "raw", progress=False,
          expert_sources=[{"name": e.name, "task": e.task, "folder": str(f), "fold": 0, "labels": dict(e.labels)}
                          for e, f in zip(bank, folders)])
    return {"run": tmp / "run", "raw": tmp / "raw", "manifests": manifests, "experts": folders}
