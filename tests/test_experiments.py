"""The main job end to end on a tiny benchmark: the papermill notebooks train_amalgam -> evaluate -> ablations, with
small random nnU-Net experts given as model folders (no nnU-Net training), and the reproducibility claim of issue 5:
given the same experts, training and evaluation again give byte-identical metrics.json."""
import json
import shutil
from pathlib import Path

import pytest

from amalgam.cli import demo_manifests
from amalgam.config import AmalgamError
from amalgam.experiments import Recipe, expert_bank, merge_mappings
from amalgam.experts import Expert, save_model_folder
from amalgam.manifests import load_manifest, materialize
from amalgam.phantoms import write_phantom_manifests
from amalgam.reports import load_params, run_notebook
from tiny_experts import tiny_test_expert

NBS = Path(__file__).resolve().parents[1] / "nbs" / "experiments"
TINY = {"train": {"steps": 3, "checkpoint_every": 2, "warmup_steps": 1}, "data": {"batch_size": 2}, "pretrain_steps": 2,
        "model": {"feature_size": 12, "hidden_dim": 24, "transformer_dim": 32, "iou_head_hidden_dim": 32},
        "eval": {"n_boot": 50, "modes": ["auto", "box", "click3"]}}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "Two phantom tasks (5 cases of 64 x 64 x 24 (24 slices of 64 x 64 along the 2D axis): 3 train, 1 val, 1 test), materialised, and one small random expert per task."
    root = tmp_path_factory.mktemp("e2e")
    manifests = [str(m) for m in write_phantom_manifests(root / "manifests", tasks=["ct_abdomen", "mr_cardiac"], n_cases=5, shape=[64, 64, 24])]
    ws = root / "ws"
    for m in manifests: materialize(m, ws / "nnUNet_raw", cache_dir=ws / "sources" / "phantom")
    folders = {}
    for m in map(load_manifest, manifests):
        tiny = tiny_test_expert(2, num_classes=len(m.labels), name=m.task, modality=m.modality)
        expert = Expert(tiny.network, tiny.plans, {**tiny.dataset_json, "labels": m.labels, "amalgam_task": m.task}, tiny.configuration, name=m.task)
        folders[m.task] = str(save_model_folder(expert, root / "experts" / m.task, fold=0))
    return {"manifests": manifests, "workspace": str(ws), "expert_folders": folders, "root": root}


def _run(bench, notebook, name, recipe=None, **extra):
    out = bench["root"] / "reports" / name
    params = {"manifests": bench["manifests"], "workspace": bench["workspace"], **extra}
    if notebook != "distill.ipynb": params["recipe"] = merge_mappings(TINY, recipe or {})  # a student takes its teacher's
    if notebook not in ("evaluate.ipynb", "distill.ipynb"):  # these use the run's own experts
        params["expert_folders"] = bench["expert_folders"]
    run_notebook(NBS / notebook, out, params, overwrite=True)
    return json.loads((out / "metrics.json").read_text()), out


@pytest.mark.slow
def test_train_evaluate_ablate_and_reproduce(bench):
    train, out = _run(bench, "train_amalgam.ipynb", "train")
    assert set(train["final"]) == {"ka2er", "baseline"}
    assert train["final"]["ka2er"]["step"] == train["final"]["baseline"]["step"] == TINY["train"]["steps"]
    assert train["final"]["ka2er"]["kd"] > 0 == train["final"]["baseline"]["kd"]
    assert (out / "report.html").is_file() and (out / "provenance.json").is_file()
    assert train["parameters"]["baseline"]["amalgamation"] == 0 < train["parameters"]["ka2er"]["amalgamation"]
    ev, out = _run(bench, "evaluate.ipynb", "evaluate", litemedsam=True, litemedsam_slices=1, cross_task=True)
    methods = {(r["method"], r["mode"]) for r in ev["records"]}
    for mode in TINY["eval"]["modes"]:
        assert ("ka2er", mode) in methods and ("baseline", mode) in methods
    assert ("expert", "auto") in methods and ("LiteMedSAM", "box@slices") in methods
    assert any(m.startswith("expert ") for m, _ in methods), "cross-task rows missing"
    n_classes = 3 + 3  # ct_abdomen: liver, spleen, kidney; mr_cardiac: three structures; one test case each
    assert sum(1 for r in ev["records"] if (r["method"], r["mode"]) == ("ka2er", "auto")) == n_classes
    assert {c["b"] for c in ev["comparisons"]} >= {"expert auto", "baseline auto", "LiteMedSAM box@slices"}
    assert {q: set(c["tasks"]) for q, c in ev["claims"].items()} == {q: {"ct_abdomen", "mr_cardiac"} for q in ("Q1", "Q1b", "Q2")}
    assert all(isinstance(c["holds"], bool) for c in ev["claims"].values())  # every method was evaluated: a verdict each
    first = (bench["root"] / "reports" / "evaluate" / "metrics.json").read_bytes()

    st, _ = _run(bench, "distill.ipynb", "distill", steps=2, modes=["auto"], n_boot=50, timing_cases=1)
    assert [(r["task"], r["mode"]) for r in st["retention"]] == [("ct_abdomen", "auto"), ("mr_cardiac", "auto")]
    assert {r["method"] for r in st["records"]} == {"teacher", "student"} and st["training"]["student"]["kd"] > 0
    assert st["speed"]["speedup"] > 0 and len(st["speed"]["volumes"]) == 2
    first_train = (bench["root"] / "reports" / "train" / "metrics.json").read_bytes()

    ab, _ = _run(bench, "ablations.ipynb", "ablations", variants=["no_distillation", "no_routing_loss"], expert_counts=[1],
                 ablation_modes=["auto"], recipe={"ablation_steps": 2})
    assert ab["skipped_as_full"] == ["no_routing_loss"]  # routing_weight is 0 in this recipe: nothing to ablate
    assert ab["variants"] == ["ka2er", "no_distillation", "experts_k1"]
    assert {r["method"] for r in ab["records"]} == set(ab["variants"])

    grow, _ = _run(bench, "add_expert.ipynb", "add_expert", new_task="mr_cardiac", modes=["auto"],
                   recipe={"ablation_steps": 2})  # reuses the ablations' 2-step reference as "from scratch"
    assert grow["old_tasks"] == ["ct_abdomen"] and [c["task"] for c in grow["new_task_vs_expert"]] == ["mr_cardiac"]
    assert [c["task"] for c in grow["old_tasks_change"]] == ["ct_abdomen"]
    assert grow["cost"]["grown"]["steps"] == 1 and grow["cost"]["grown_over_scratch"] > 0
    assert {r["method"] for r in grow["records"]} == {"base", "grown", "scratch", "expert"}

    # same experts, everything trained and evaluated again from scratch: identical metrics.json
    ws = Path(bench["workspace"])
    shutil.rmtree(ws / "runs"); shutil.rmtree(ws / "pretrained")
    _run(bench, "train_amalgam.ipynb", "train")
    _run(bench, "evaluate.ipynb", "evaluate", litemedsam=True, litemedsam_slices=1, cross_task=True)
    assert (bench["root"] / "reports" / "train" / "metrics.json").read_bytes() == first_train
    assert (bench["root"] / "reports" / "evaluate" / "metrics.json").read_bytes() == first


def test_expert_bank_from_folders(bench):
    bank, sources = expert_bank(bench["manifests"], Recipe(), bench["workspace"], bench["expert_folders"])
    assert sorted(bank.names) == ["ct_abdomen", "mr_cardiac"]
    assert {s["folder"] for s in sources} == set(bench["expert_folders"].values())
    with pytest.raises(AmalgamError, match="unknown task"):
        expert_bank(bench["manifests"], Recipe(), bench["workspace"], {"ct_chest": "x"})


@pytest.mark.parametrize("name", sorted(p.stem for p in (NBS / "params").glob("*.yaml")))
def test_phantom_params_files_list_the_manifests_in_the_demo_order(name):
    "The manifests' order is the experts' order in a run, so a params file must list them as `amalgam demo` does."
    listed = load_params(NBS / "params" / f"{name}.yaml").get("manifests", [])
    if any("phantom_" in str(m) for m in listed):
        assert [Path(m).name for m in listed] == [p.name for p in demo_manifests()]


@pytest.mark.parametrize("name", sorted(p.stem for p in (NBS / "params").glob("ka2er_*.yaml")))
def test_params_files_hold_valid_recipes(name):
    "Every KA2ER params file's `recipe:` is a valid nested Recipe (a misspelt or moved key fails here, not hours in)."
    recipe = Recipe.from_notebook(load_params(NBS / "params" / f"{name}.yaml")["recipe"], "cpu", 0)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.model.spatial_dims == recipe.data.spatial_dims == recipe.spatial_dims
