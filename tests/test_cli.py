"""The `amalgam` console script end to end: exit codes, messages, and the demo's data step on the shipped benchmark."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import amalgam.cli as cli
from amalgam.cli import DEFAULT_DEMO_STEPS, DEMO_PROFILES, DEMO_STEPS, check_demo_plan, demo_plan, main, run_demo
from amalgam.config import repo_root, write_json
from amalgam.manifests import load_manifest
from amalgam.reports import REPORT_WRITER, check_offline, notebook_parameters

ROOT = repo_root(Path(__file__).parent)
AMALGAM = [sys.executable, "-m", "amalgam.cli"]


def run(*args, **kw):
    return subprocess.run([*AMALGAM, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


@pytest.mark.slow
def test_validate_shipped_manifests_schema():
    r = run("validate", "--schema-only", *sorted((ROOT / "data_manifests").glob("*.yaml")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok") == len(list((ROOT / "data_manifests").glob("*.yaml")))


def test_bad_manifest_exit_2_names_file_and_every_problem(tmp_path):
    text = (ROOT / "data_manifests" / "phantom_mr_brain.yaml").read_text()
    bad = tmp_path / "broken.yaml"
    bad.write_text(text.replace("dataset_id:", "datset_id:").replace("label_quality: synthetic", "label_quality: platinum"))
    r = run("validate", "--schema-only", bad)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert all(str(bad) in l for l in lines), r.stderr
    assert any("datset_id" in l for l in lines) and any("platinum" in l for l in lines), r.stderr


@pytest.mark.parametrize("argv, message", [
    (["report", "missing.ipynb", "out"], "missing.ipynb: notebook not found"),
    (["report", "nbs/experiments/data_report.ipynb", "out", "-p", "1x=2"], "expected name=value"),
    (["materialize", "no/such/manifest.yaml"], "no/such/manifest.yaml"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[0], err


def test_unknown_subcommand_is_usage_error():
    r = run("train-everything")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.fixture
def fake_demo(monkeypatch):
    "run_demo with run_notebook and materialize recorded (each fake report is stamped as run_notebook stamps one)."
    calls = {"run": [], "materialize": [], "checked": []}
    def run_notebook(notebook, out_dir, parameters, params_file=None, progress_bar=False):
        calls["run"].append({"notebook": Path(notebook).name, "out_dir": Path(out_dir), "parameters": parameters,
                             "params_file": params_file and Path(params_file).name})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "metrics.json", {})
        write_json(Path(out_dir) / "provenance.json", {"written_by": REPORT_WRITER, "status": "ok",
                                                       "notebook": str(notebook), "files": ["metrics.json", "provenance.json"]})
        return Path(out_dir)
    monkeypatch.setattr(cli, "run_notebook", run_notebook)
    monkeypatch.setattr(cli, "materialize", lambda m, raw, cache_dir: calls["materialize"].append((Path(m).name, raw)))
    # the params files are the profiles' own (test_demo_profiles_declare_every_parameter checks them)
    monkeypatch.setattr(cli, "check_demo_plan", lambda plan: calls["checked"].append([s["step"] for s in plan]))
    return calls


def test_demo_profiles_render_into_their_own_folders(tmp_path, fake_demo, capsys):
    ws, reports = tmp_path / "ws", tmp_path / "reports"
    manifests = [str(m) for m in sorted((ROOT / "data_manifests").glob("phantom_*.yaml"))]
    assert main(["demo", "--profile", "proof", "--steps", "data", "experts", "train", "--workspace", str(ws),
                 "--reports", str(reports)]) == 0
    runs = fake_demo["run"]
    assert [r["out_dir"] for r in runs] == [reports / "proof" / s for s in ("data", "experts", "train")]
    assert [r["params_file"] for r in runs] == [None, "train_experts_proof.yaml", "ka2er_proof.yaml"]
    assert all(r["parameters"] == {"manifests": manifests, "workspace": str(ws / "proof")} for r in runs), runs
    assert {raw for _, raw in fake_demo["materialize"]} == {ws / "proof" / "nnUNet_raw"}
    assert main(["demo", "--steps", "data", "evaluate", "--workspace", str(ws), "--reports", str(reports)]) == 0
    runs = fake_demo["run"][3:]
    assert [(r["out_dir"], r["params_file"]) for r in runs] == [(reports / "data", None),
                                                                 (reports / "evaluate", "ka2er_smoke.yaml")]
    assert all(r["parameters"]["workspace"] == str(ws) for r in runs)
    assert {raw for _, raw in fake_demo["materialize"][len(manifests):]} == {ws / "nnUNet_raw"}
    assert fake_demo["checked"] == [["data", "experts", "train"], ["data", "evaluate"]]   # before the first step
    index = (reports / "index.html").read_text()   # one index for both profiles
    for rel in ("proof/data", "proof/experts", "proof/train", "data", "evaluate"):
        assert f"<a href='{rel}/report.html'>" in index, rel
    assert not (reports / "proof" / "index.html").exists()
    # the real-scans check runs only when named, on the TotalSegmentator manifests with the profile's recipe
    assert main(["demo", "--profile", "proof", "--steps", "real_scans", "--workspace", str(ws),
                 "--reports", str(reports)]) == 0
    real = fake_demo["run"][-1]
    assert (real["out_dir"], real["params_file"]) == (reports / "proof" / "real_scans", "ka2er_proof.yaml")
    assert [Path(m).name for m in real["parameters"]["manifests"]] == ["totalseg_ct_abdomen.yaml",
                                                                       "totalseg_mr_abdomen.yaml"]
    assert real["parameters"]["sdist_cache"] == str(ws / "sources" / "pip_sdist")


def test_demo_passes_each_notebook_only_what_it_declares(tmp_path):
    for profile in DEMO_PROFILES:
        plan = demo_plan(profile, workspace_dir=tmp_path / "ws", reports_dir=tmp_path / "reports",
                         params={"device": "cpu", "max_cases": 2})
        assert [s["step"] for s in plan] == list(DEFAULT_DEMO_STEPS)
        for s in plan:
            assert set(s["parameters"]) <= set(notebook_parameters(s["notebook"])), (profile, s["step"])
            assert ("max_cases" in s["parameters"]) == (s["step"] == "data")
    with pytest.raises(cli.AmalgamError, match=r"\['max_cases'\] are declared by none of the steps \['train'\]"):
        demo_plan("smoke", ["train"], tmp_path / "ws", tmp_path / "reports", params={"max_cases": 2})


@pytest.mark.parametrize("profile", list(DEMO_PROFILES))
def test_demo_profiles_declare_every_parameter(profile, tmp_path):
    """Every params file of every profile exists and holds only parameters its notebook declares (as the demo checks),
    for every step, those run only when named included."""
    check_demo_plan(demo_plan(profile, DEMO_STEPS, workspace_dir=tmp_path / "ws", reports_dir=tmp_path / "reports"))


def test_demo_refuses_a_report_folder_that_is_not_a_report(tmp_path, capsys):
    reports = tmp_path / "reports"
    (reports / "data").mkdir(parents=True)
    (reports / "data" / "a.txt").write_text("keep")
    assert main(["demo", "--steps", "data", "--workspace", str(tmp_path / "ws"), "--reports", str(reports)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a previous report" in err[0], err
    assert (reports / "data" / "a.txt").read_text() == "keep" and not (tmp_path / "ws").exists()


@pytest.mark.slow
def test_demo_data_step_renders_an_offline_report_and_is_idempotent(tmp_path, capsys):
    ws, reports = tmp_path / "ws", tmp_path / "reports"
    timings = run_demo(ws, reports, steps=["data"])
    assert set(timings) == {"data"}
    report = reports / "data"
    assert sorted(p.name for p in report.iterdir()) == ["data_report.ipynb", "metrics.json", "provenance.json", "report.html"]
    check_offline((report / "report.html").read_text(), "report.html")
    prov = json.loads((report / "provenance.json").read_text())
    manifests = sorted((ROOT / "data_manifests").glob("phantom_*.yaml"))
    assert sorted(prov["manifests"]) == sorted(str(m) for m in manifests)
    assert all(len(h) == 64 for h in prov["manifests"].values())
    assert prov["git"]["commit"] is None or len(prov["git"]["commit"]) == 40
    assert "data/report.html" in (reports / "index.html").read_text()
    for m in manifests:
        assert (ws / "nnUNet_raw" / load_manifest(m).dataset_folder_name / "dataset.json").is_file(), m
    capsys.readouterr()
    run_demo(ws, reports, steps=["data"])   # the second run rebuilds nothing
    out = capsys.readouterr().out
    assert out.count("nothing changed") == len(manifests), out
