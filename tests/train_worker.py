"""The tiny training setup of tests/test_train.py, runnable in its own process: the resume test SIGKILLs it mid-run, the DDP test
launches it under torchrun. `python tests/train_worker.py DATA_DIR RUN_DIR` (DATA_DIR: phantom manifests *.yaml + raw/)."""
import argparse
from pathlib import Path

import torch

from amalgam.data import DataConfig, task_classes
from amalgam.experts import ExpertBank
from amalgam.losses import LossConfig
from amalgam.model import KA2ERConfig
from amalgam.train import TrainConfig, train
from tiny_experts import tiny_test_expert

TASKS = {"ct_abdomen": 4, "ct_lung": 3}  # phantom task -> expert output channels (background + classes)
STEPS = 5


def setup(data_dir, steps: int = STEPS, experts: bool = True, **train_overrides) -> dict:
    "Keyword arguments of `train` for the tiny 2D setup: two random-init nnU-Net experts, batch 4, patch 64 x 64, corrective clicks."
    manifests = sorted(Path(data_dir).glob("*.yaml"))
    model = KA2ERConfig(spatial_dims=2, feature_size=12, hidden_dim=32, num_heads=4, transformer_dim=32, iou_head_hidden_dim=32,
                        mask_in_chans=8, tasks=task_classes(manifests))
    data = DataConfig(spatial_dims=2, patch_size=(64, 64), batch_size=4, seed=24)  # seed 24: steps 0-4 are points, box, points, auto, points
    trn = TrainConfig(**{**dict(steps=steps, lr=1e-3, warmup_steps=2, checkpoint_every=1, log_every=1, corrective_clicks=1), **train_overrides})
    bank = ExpertBank([tiny_test_expert(2, num_classes=k, name=t, seed=i) for i, (t, k) in enumerate(TASKS.items())]) if experts else None
    return dict(manifests=manifests, model_config=model, data_config=data, train_config=trn, loss_config=LossConfig(), experts=bank,
                root=Path(data_dir) / "raw")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data_dir"); p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--corrective-clicks", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the same kernels (and float summation order) as the in-process runs of the tests
    train(a.run_dir, **setup(a.data_dir, a.steps, corrective_clicks=a.corrective_clicks), progress=False)


if __name__ == "__main__":
    main()
