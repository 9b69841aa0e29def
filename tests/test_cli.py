"""The `amalgam` console script end to end: exit codes, messages, and the demo's data step on the shipped benchmark."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from amalgam.cli import main, run_demo
from amalgam.config import repo_root
from amalgam.manifests import load_manifest
from amalgam.reports import check_offline

ROOT = repo_root(Path(__file__).parent)
AMALGAM = [sys.executable, "-m", "amalgam.cli"]


def run(*args, **kw):
    return subprocess.run([*AMALGAM, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


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
