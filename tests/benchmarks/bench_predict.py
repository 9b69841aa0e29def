"""Wall time of `amalgam predict` end to end (a new process: imports, run and expert loading, reading the scan,
inference, writing the mask), as a user runs it, on a CT-sized scan: issue 11's box-prompted target (512 x 512 x 48,
a box over 3 slices, <= 15 s on 2 cores) and, with --auto, whole-volume automatic mode side by side with nnU-Net's own
predictor (`nnUNetv2_predict_from_modelfolder`, the task's expert from the run's config, no test-time mirroring) on
the same file (target: amalgam <= 2 x nnU-Net). Each tool preprocesses the file its own way: nnU-Net resamples it to
its expert's spacing, amalgam to the run's `DataConfig.pixdim` (none in the phantom recipes).

Not a test (pytest does not collect it); it prints figures. Example:
    python tests/benchmarks/bench_predict.py workspace/proof/runs/ka2er --task ct_abdomen:liver --repeats 3
The scan is synthetic (soft-tissue noise around 40 HU with a brighter ellipsoid, 0.7 x 0.7 x 5 mm, LPS-stored as a
scanner writes it): its content does not change the cost, only its size and the prompt's extent do. Each repeat is a
fresh process, so model loading is counted every time; the figure is the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from amalgam.experts import install_trainers
from amalgam.run import read_run_config


def synthetic_ct(path: Path, shape=(512, 512, 48), spacing=(0.7, 0.7, 5.0), seed=0) -> np.ndarray:
    "A CT-like volume (file axes i, j, k) saved as NIfTI with an LPS affine; returns the ellipsoid's mask."
    rng = np.random.default_rng(seed)
    i, j, k = np.ogrid[:shape[0], :shape[1], :shape[2]]
    c = np.asarray(shape) / 2
    blob = ((i - c[0]) / 80) ** 2 + ((j - c[1]) / 60) ** 2 + ((k - c[2]) / 10) ** 2 <= 1
    data = rng.normal(40, 20, shape).astype(np.float32) + 60 * blob
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(path))
    return blob


def run(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nexit code {out.returncode}\n{out.stderr[-2000:]}")
    return dt


def nnunet_time(run_dir: str, task: str, scan: Path, work: Path) -> tuple[float, str]:
    """Wall time of nnU-Net's own predictor (a new process, as `nnUNetv2_predict_from_modelfolder` runs) with the run's
    expert of `task` on `scan`; and the expert's folder."""
    cfg = read_run_config(run_dir)  # checked: a run folder's config.json with its experts
    expert = next((e for e in cfg["experts"] if e["task"] == task.split(":")[0]), None)
    if expert is None:
        sys.exit(f"{run_dir}: no expert of task {task.split(':')[0]!r} in its config.json")
    inp, out = work / "nnunet_in", work / "nnunet_out"
    inp.mkdir()
    (inp / "ct_0000.nii.gz").symlink_to(scan)  # nnU-Net's file naming: case + channel
    env = {**os.environ, "nnUNet_extTrainer": str(install_trainers(work / "trainers"))}
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out),
           "-m", expert["folder"], "-f", str(expert["fold"]), "-device", "cpu", "--disable_tta",
           "-npp", "1", "-nps", "1"]
    return run(cmd, env), expert["folder"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run folder (config.json + model.pt), e.g. workspace/proof/runs/ka2er")
    p.add_argument("--task", required=True, help="the prompt's task:class, e.g. ct_abdomen:liver")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 48])
    p.add_argument("--box-slices", type=int, default=3, help="slices (along k) the box spans")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--auto", action="store_true",
                   help="also time whole-volume automatic mode and nnU-Net's predictor with the task's expert (once)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    amalgam = str(Path(sys.executable).parent / "amalgam")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        scan = d / "ct.nii.gz"
        blob = synthetic_ct(scan, tuple(a.shape))
        idx = np.argwhere(blob)
        k0 = int(a.shape[2] // 2 - a.box_slices // 2)
        lo, hi = idx.min(0), idx.max(0)
        box = [[int(lo[0]), int(lo[1]), k0], [int(hi[0]), int(hi[1]), k0 + a.box_slices - 1]]
        (d / "prompts.json").write_text(json.dumps({"coordinate_system": "voxel", "box": box, "task": a.task}))
        box_times = [run([amalgam, "predict", "-r", a.run, "-i", str(scan), "-o", str(d / f"box{r}"),
                          "--prompts", str(d / "prompts.json")]) for r in range(a.repeats)]
        figures = {"shape": a.shape, "box": box, "box_seconds": [round(t, 2) for t in box_times],
                   "box_median_s": round(statistics.median(box_times), 2)}
        print(f"box over {a.box_slices} slices of {'x'.join(map(str, a.shape))}: median {figures['box_median_s']} s "
              f"(runs {figures['box_seconds']}), model loading included; target <= 15 s on 2 cores")
        if a.auto:
            t = run([amalgam, "predict", "-r", a.run, "-i", str(scan), "-o", str(d / "auto"), "--auto",
                     "--task", a.task])
            nn, folder = nnunet_time(a.run, a.task, scan, d)
            figures.update(auto_seconds=round(t, 2), nnunet_seconds=round(nn, 2), nnunet_expert=folder,
                           auto_over_nnunet=round(t / nn, 2))
            print(f"automatic mode, whole volume: {t:.1f} s; nnU-Net's predictor with the task's expert: {nn:.1f} s "
                  f"(ratio {t / nn:.2f}, target <= 2)")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
