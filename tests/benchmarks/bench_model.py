"""Forward time and peak memory of each KA2ER part (experts, foundation, amalgamation, decoder) at several input sizes,
and the exponent of peak-memory growth with the number of voxels (slope of log memory vs log voxels).

Not a test (pytest does not collect it); it prints figures. Examples:
    python tests/benchmarks/bench_model.py --spatial-dims 3 --sizes 32x32x64 64x64x64 64x64x128 --experts 2
    python tests/benchmarks/bench_model.py --device cuda --sizes 64x64x64 128x128x64 128x128x128 --feature-size 24
Experts are random-init nnU-Net PlainConvUNets built from synthetic plans: `--expert-size tiny` (8/16/32 features, the
test experts) or `--expert-size nnunet` (nnU-Net's default feature counts, amalgam.experts.NNUNET_DEFAULT_FEATURES: the
cost of a real expert). `--json PATH` also writes the figures as JSON, `--label` tags them (before/after comparisons:
run the script twice with different PYTHONPATHs, interleaved, in one shell invocation).

Time and memory are measured by amalgam.benchmarking, as the benchmark report measures them: the median of --repeats
runs after a warm-up, then the peak tensor memory a part allocates above what was allocated before it ran (CUDA:
torch.cuda.max_memory_allocated; CPU: torch.profiler's allocation events in time order). Both count torch tensors only,
not allocator caches, the process, or the NumPy arrays of the experts' nnU-Net normalisation (CPU side, before their
networks run).
By default the trainable parts run with autograd on, as in training, so saved activations count; --no-grad measures inference.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

from amalgam.benchmarking import median_seconds, memory
from amalgam.experts import NNUNET_DEFAULT_FEATURES, Expert, ExpertBank
from amalgam.model import KA2ERConfig, build_model, zscore
from amalgam.prompts import Prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fixtures
from tiny_experts import tiny_test_expert  # noqa: E402

PARTS = ("experts", "foundation", "amalgamation", "decoder", "total")
FEATURES = {"tiny": {2: (8, 16, 32), 3: (8, 16, 32)}, "nnunet": NNUNET_DEFAULT_FEATURES}


def make_expert(spatial_dims: int, name: str, seed: int, size: str = "tiny") -> Expert:
    "A seeded random-init nnU-Net expert from synthetic plans, of the test size or nnU-Net's default width."
    return tiny_test_expert(spatial_dims, 1, 3, name=name, seed=seed, features=FEATURES[size][spatial_dims])


def parse_size(text: str, spatial_dims: int) -> tuple[int, ...]:
    size = tuple(int(s) for s in text.lower().split("x"))
    if len(size) == 1: size = size * spatial_dims
    if len(size) != spatial_dims: raise SystemExit(f"--sizes {text}: expected {spatial_dims} sizes joined by 'x' (or one size)")
    return size


def bench_size(model, size, device, repeats, grad, batch=1):
    x = (300 * torch.randn(batch, 1, *size) + 40).to(device)
    centre = torch.tensor([[[s / 2 for s in size]]] * batch, device=device)
    prompts = Prompts(points=centre, point_labels=torch.ones(batch, 1, dtype=torch.long, device=device),
                      classes=torch.zeros(batch, dtype=torch.long, device=device))
    mode = contextlib.nullcontext if grad else torch.no_grad
    with torch.no_grad():  # inputs of the later parts, computed once
        fnd = model.foundation(zscore(x))
        exp = model.expert_features(x) if model.experts is not None else None
        feats = model.amalgamation(fnd, exp).features if exp is not None else fnd

    def run(fn):
        def wrapped():
            with mode(): return fn()
        return wrapped
    calls = {"foundation": run(lambda: model.foundation(zscore(x))),
             "decoder": run(lambda: model.decode(feats, prompts)),
             "total": run(lambda: model(x, prompts))}
    if exp is not None:
        calls["experts"] = lambda: model.expert_features(x)  # always inference mode: the experts are frozen
        calls["amalgamation"] = run(lambda: model.amalgamation(fnd, exp))
    rows = {}
    for part in PARTS:
        if part not in calls: continue
        rows[part] = (median_seconds(calls[part], device, repeats), memory(calls[part], device)["peak_MiB"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    ap.add_argument("--sizes", nargs="+", default=None, help="input sizes, e.g. 32x32x64 64x64x64 64x64x128 (default: three sizes doubling the voxels)")
    ap.add_argument("--experts", type=int, default=2, help="number of experts K (0: the baseline, no amalgamation)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--feature-size", type=int, default=12)
    ap.add_argument("--hidden-dim", type=int, default=48)
    ap.add_argument("--transformer-dim", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per part (the median is reported)")
    ap.add_argument("--no-grad", action="store_true", help="measure inference (no autograd) instead of a training forward")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=1, help="images per forward")
    ap.add_argument("--expert-size", default="tiny", choices=tuple(FEATURES), help="tiny test experts or nnU-Net's default widths")
    ap.add_argument("--label", default="", help="a tag printed with the results and stored in --json")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    d = args.spatial_dims
    sizes = [parse_size(s, d) for s in args.sizes] if args.sizes else \
        ([(32, 32, 64), (32, 64, 64), (64, 64, 64)] if d == 3 else [(64, 64), (64, 128), (128, 128)])
    if len(sizes) < 2: raise SystemExit("--sizes: give at least two sizes to fit a growth exponent")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device available")

    cfg = KA2ERConfig(spatial_dims=d, feature_size=args.feature_size, hidden_dim=args.hidden_dim, transformer_dim=args.transformer_dim,
                      iou_head_hidden_dim=args.transformer_dim, tasks={"bench": ["a", "b"]})
    bank = ExpertBank([make_expert(d, f"expert{k}", k, args.expert_size) for k in range(args.experts)]) if args.experts else None
    model = build_model(cfg, bank).to(device).train(not args.no_grad)
    if bank is not None: bank.to(device)
    counts = model.parameter_counts()
    print(f"{args.label + ': ' if args.label else ''}KA2ER {d}D, K={args.experts} {args.expert_size} experts, batch {args.batch}, feature_size={args.feature_size}, device={device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"{'inference (no grad)' if args.no_grad else 'training forward (autograd on)'}, median of {args.repeats}")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items()))
    print(f"{'input':>14} {'voxels':>10} " + " ".join(f"{p + ' ms':>16} {p + ' MiB':>17}" for p in PARTS))
    results = {}
    for size in sizes:
        rows = bench_size(model, size, device, args.repeats, not args.no_grad, args.batch)
        results[size] = rows
        cells = [f"{rows[p][0] * 1e3:16.1f} {rows[p][1]:17.1f}" if p in rows else f"{'-':>16} {'-':>17}" for p in PARTS]
        print(f"{'x'.join(map(str, size)):>14} {math.prod(size):>10} " + " ".join(cells))
    vox = np.log([math.prod(s) for s in sizes])
    print("memory growth exponent (slope of log peak MiB vs log voxels; 1 = linear):")
    exponents = {}
    for p in PARTS:
        mem = [results[s][p][1] for s in sizes if p in results[s]]
        if len(mem) == len(sizes) and min(mem) > 0:
            exponents[p] = float(np.polyfit(vox, np.log(mem), 1)[0])
            print(f"  {p:<13} {exponents[p]:.2f}")
    if args.json:
        import json
        out = {"label": args.label, "args": vars(args), "exponents": exponents,
               "rows": [{"size": list(s), "part": p, "seconds": t, "peak_MiB": m} for s in sizes for p, (t, m) in results[s].items()]}
        with open(args.json, "w") as f: json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
