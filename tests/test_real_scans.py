"""Issue 11's pipeline check on real scans: the TotalSegmentator CT and MR examples (from the PyPI sdist, downloaded once
into <repo>/workspace/sources/pip_sdist) through `nbs/experiments/real_scans.ipynb`: materialised, KA²ER trained on
both tasks with one (small random) expert each, scored on the training cases and labelled silver standard."""
import json
from pathlib import Path

import pytest

from amalgam.config import manifests_dir
from amalgam.experts import Expert, save_model_folder
from amalgam.manifests import load_manifest
from amalgam.reports import run_notebook
from test_experiments import NBS, TINY
from test_manifests import SDIST_CACHE
from tiny_experts import tiny_test_expert

TASKS = ("totalseg_ct_abdomen", "totalseg_mr_abdomen")


@pytest.mark.slow
def test_real_scans_pipeline_check(tmp_path):
    manifests = [str(manifests_dir() / f"{t}.yaml") for t in TASKS]
    folders = {}
    for m in map(load_manifest, manifests):
        tiny = tiny_test_expert(2, num_classes=len(m.labels), name=m.task, modality=m.modality)
        e = Expert(tiny.network, tiny.plans, {**tiny.dataset_json, "labels": m.labels, "amalgam_task": m.task},
                   tiny.configuration, name=m.task)
        folders[m.task] = str(save_model_folder(e, tmp_path / "experts" / m.task, fold=0))
    out = tmp_path / "report"
    params = {"manifests": manifests, "workspace": str(tmp_path / "ws"), "sdist_cache": str(SDIST_CACHE),
              "expert_folders": folders, "recipe": {**TINY, "pretrain_steps": 0}, "modes": ["auto", "box"]}
    # automatic mode answers all ten organs of a volume from one pass (amalgam.evaluation.automatic_segmentations);
    # scored one organ at a time, it had not finished after 12 min at this size
    run_notebook(NBS / "real_scans.ipynb", out, params)
    res = json.loads((out / "metrics.json").read_text())
    assert res["split"] == "train" and res["label_quality"] == {t: "silver" for t in TASKS}
    assert "silver-standard" in res["caveat"] and "train cases" in res["caveat"]
    # three training volumes (two CT, one MR), ten organs each, scored by KA²ER in both modes and by its own expert
    ka2er = [r for r in res["records"] if r["method"] == "ka2er"]
    assert len(ka2er) == 3 * 10 * 2 and {r["task"] for r in ka2er} == set(TASKS)
    assert sorted({r["mode"] for r in ka2er}) == ["auto", "box"]
    assert sum(r["method"] == "expert" for r in res["records"]) == 3 * 10
    # the organ names are shared, so each expert is scored on the other modality too
    assert {r["method"] for r in res["records"]} == {"ka2er", "expert", "expert totalseg_ct_abdomen",
                                                     "expert totalseg_mr_abdomen"}
    assert all(r["split"] == "train" and r["label_quality"] == "silver" for r in res["records"])
    assert "silver-standard" in (out / "report.html").read_text()

    with pytest.raises(Exception, match="split 'test' has no cases in: totalseg_ct_abdomen"):
        run_notebook(NBS / "real_scans.ipynb", tmp_path / "bad", {**params, "split": "test"})
