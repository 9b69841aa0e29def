"""Reports (issue 13 items 1-3, issue 14 section 5): `amalgam report` refuses undeclared parameters, never deletes a
user's files, never writes outside its output folder; the index skips what it cannot read and carries a headline per
report kind; third-party FutureWarnings and DeprecationWarnings stay out of rendered reports."""
import json
from pathlib import Path

import nbformat
import pytest

from amalgam.cli import main
from amalgam.config import repo_root, write_json
from amalgam.reports import REPORT_WRITER, check_out_dir, render_index, run_notebook

ROOT = repo_root(Path(__file__).parent)


def tiny(path: Path, params: str = "out_dir = None", body: str = "") -> Path:
    "The issue's two-cell notebook: a `parameters` cell, and a cell that runs `body` and writes {} to metrics.json."
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(f"{body}\nimport pathlib\n"
                                          "pathlib.Path(out_dir, 'metrics.json').write_text('{}')")]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def amalgam(capsys, monkeypatch):
    "`amalgam ARGS` run in this process from the folder `cwd`: (exit code, stdout, stderr)."
    def run(*args, cwd=ROOT):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        return (code, *capsys.readouterr())
    return run


def snapshot(folder: Path) -> dict:
    "Every file below `folder` with its bytes (what must not change)."
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(result: tuple) -> str:
    "The one line on stderr of a command that exited with 2 (bad input)."
    code, _, err = result
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err.strip()


def test_unknown_parameter_is_refused_with_a_hint(tmp_path, amalgam):
    nb = tiny(tmp_path / "tiny.ipynb", params="steps = 3\nout_dir = None")
    line = one_line(amalgam("report", nb, tmp_path / "out", "-p", "nosuchparam=3"))
    assert "tiny.ipynb" in line and "'nosuchparam'" in line and "declares steps, out_dir" in line, line
    assert "did you mean 'steps'" in one_line(amalgam("report", nb, tmp_path / "out", "-p", "step=3"))
    (tmp_path / "p.yaml").write_text("stpes: 5\n")
    line = one_line(amalgam("report", nb, tmp_path / "out", "-f", tmp_path / "p.yaml"))
    assert "'stpes' (did you mean 'steps'?)" in line, line
    assert "manifests" in one_line(amalgam("report", tiny(tmp_path / "m.ipynb", "manifests = None\nout_dir = None"),
                                           tmp_path / "out", "-p", "manifests=5"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_is_not_a_report_is_never_replaced(tmp_path, amalgam, overwrite):
    nb = tiny(tmp_path / "tiny.ipynb")
    notes = tmp_path / "notes"
    notes.mkdir(); (notes / "a.txt").write_text("keep")
    line = one_line(amalgam("report", nb, notes, *overwrite))
    assert "notes" in line and "is not a previous report" in line, line
    assert snapshot(notes) == {"a.txt": b"keep"} and not (tmp_path / "notes.failed").exists()


@pytest.mark.parametrize("where", ["cwd", "repo", "home", "root"])
def test_dangerous_folders_are_refused_always(tmp_path, amalgam, where):
    nb = tiny(tmp_path / "tiny.ipynb")
    work = tmp_path / "work"
    work.mkdir(); (work / "a.txt").write_text("keep")
    out, cwd = {"cwd": (".", work), "repo": (".", ROOT), "home": (Path.home(), work), "root": ("/", work)}[where]
    before = snapshot(work)
    line = one_line(amalgam("report", nb, out, "--overwrite", cwd=cwd))
    why = {"cwd": "the current folder", "repo": "the current folder", "home": "home folder",
           "root": "file-system root"}[where]
    assert why in line, line
    assert snapshot(work) == before and (ROOT / ".git").exists() and (ROOT / "settings.ini").is_file()


def test_the_repository_is_refused_from_outside_it(tmp_path, amalgam):
    line = one_line(amalgam("report", tiny(tmp_path / "tiny.ipynb"), ROOT, "--overwrite", cwd=tmp_path))
    assert "the amalgam checkout" in line, line


def test_a_previous_report_is_replaced_and_nothing_is_written_outside(tmp_path, amalgam):
    nb = tiny(tmp_path / "tiny.ipynb", params="tag = 0\nout_dir = None")
    reports = tmp_path / "reports"
    (reports / "other").mkdir(parents=True); (reports / "other" / "provenance.json").write_text("{broken")
    out = reports / "tiny"
    r = amalgam("report", nb, out, "-p", "tag=1")
    assert r[0] == 0, r[2]
    first = json.loads((out / "provenance.json").read_text())
    assert first["written_by"] == REPORT_WRITER and sorted(first["files"]) == sorted(snapshot(out))
    assert sorted(p.name for p in reports.iterdir()) == ["other", "tiny"]   # no index.html, no leftovers
    r = amalgam("report", nb, out, "-p", "tag=2")   # a rerun replaces its own previous report (as the demo does)
    assert r[0] == 0, r[2]
    assert (first["params"]["tag"], json.loads((out / "provenance.json").read_text())["params"]["tag"]) == (1, 2)
    (out / "mine.txt").write_text("keep")
    assert "mine.txt" in one_line(amalgam("report", nb, out))
    assert (out / "mine.txt").read_text() == "keep"
    r = amalgam("report", nb, out, "--overwrite")   # asked for: a previous report is replaced with what it gained
    assert r[0] == 0, r[2]
    assert not (out / "mine.txt").exists() and sorted(p.name for p in reports.iterdir()) == ["other", "tiny"]


def test_index_skips_an_unreadable_provenance_with_a_warning(tmp_path, amalgam):
    run_notebook(tiny(tmp_path / "tiny.ipynb"), tmp_path / "reports" / "good")
    for name, text in [("broken", "{not json"), ("foreign", '{"params": {}}'), ("binary", b"\xff\xfe\x00")]:
        (tmp_path / "reports" / name).mkdir()
        p = tmp_path / "reports" / name / "provenance.json"
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    with pytest.warns(UserWarning) as caught:
        page = render_index(tmp_path / "reports").read_text()
    messages = [str(w.message) for w in caught]
    skipped = [n for n in ("broken", "foreign", "binary")
               if any(f"skipped {tmp_path}/reports/{n}" in m for m in messages)]
    assert skipped == ["broken", "foreign", "binary"], messages
    assert "good/report.html" in page and "broken" not in page and "foreign" not in page
    with pytest.warns(UserWarning, match="skipped"):
        assert amalgam("index", tmp_path / "reports")[:2] == (0, f"{tmp_path / 'reports' / 'index.html'}\n")


def report(folder: Path, notebook: str, metrics: dict) -> Path:
    "A finished report of `notebook` (as run_notebook stamps it) holding `metrics`."
    folder.mkdir(parents=True)
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "provenance.json", {"written_by": REPORT_WRITER, "status": "ok", "notebook": notebook,
                                            "files": ["metrics.json", "provenance.json"], "seconds": 1.0,
                                            "git": {"commit": "a" * 40, "dirty": False},
                                            "created_utc": "2026-01-01T00:00:00+00:00"})
    return folder


def comparison(task, a, b, mean_a, mean_b, verdict):
    "One row as amalgam.experiments.paired_comparison writes it."
    return {"task": task, "a": a, "b": b, "metric": "dice", "n": 9, "mean_a": mean_a, "mean_b": mean_b,
            "diff": mean_a - mean_b, "lo": mean_a - mean_b - 0.05, "hi": mean_a - mean_b + 0.05, "verdict": verdict}


def test_index_headline_per_report_kind(tmp_path):
    reports = tmp_path / "reports"
    report(reports / "data", "nbs/experiments/data_report.ipynb",
           {"tasks": {"ct_lung": {"cases": {"train": 14, "val": 3, "test": 3}}}, "seconds": 3.0})
    report(reports / "experts", "nbs/experiments/train_experts.ipynb",
           {"experts": {"ct_lung": {"validation_foreground_dice": 0.912, "validation_dice": {"lung": 0.9}}}})
    report(reports / "train", "nbs/experiments/train_amalgam.ipynb",
           {"final": {"ka2er": {"step": 200, "seg": 0.8451, "kd": 0.1}, "baseline": {"step": 200, "seg": 0.854}},
            "routing_accuracy_test": {"ct_lung": 0.5}})
    report(reports / "proof" / "evaluate", "nbs/experiments/evaluate.ipynb", {"comparisons": [
        comparison("ct_lung", "ka2er auto", "expert auto", 0.90, 0.91, "not distinguishable"),
        comparison("ct_lung", "ka2er auto", "baseline auto", 0.90, 0.80, "better"),
        comparison("ct_lung", "ka2er box@slices", "LiteMedSAM box@slices", 0.92, 0.70, "better"),
        comparison("mr_brain", "ka2er auto", "expert auto", 0.70, 0.80, "worse")]})
    report(reports / "ablations", "nbs/experiments/ablations.ipynb", {"comparisons": [
        comparison("ct_lung", "ka2er auto", "no_distillation auto", 0.90, 0.92, "worse")]})
    report(reports / "benchmark", "nbs/experiments/benchmark.ipynb", {"S1_2d_ratio": 1.5, "targets": {}})
    page = render_index(reports).read_text()
    assert "cases train/val/test: ct_lung 14/3/3" in page
    assert "validation Dice: ct_lung 0.91" in page
    assert "step 200, Dice+CE loss: baseline 0.854, ka2er 0.845; routing accuracy: ct_lung 0.50" in page   # write_json sorts keys
    assert "<th>ka2er auto vs expert auto</th><th>ka2er auto vs baseline auto</th>" in page
    assert "0.90 vs 0.91: <b>not distinguishable</b>" in page and "0.92 vs 0.70: <b>better</b>" in page
    assert "0.70 vs 0.80: <b>worse</b></td><td>—</td><td>—</td>" in page   # mr_brain: only against its expert
    assert "no_distillation -0.020 (worse on 1/1)" in page and "S1_2d_ratio=1.5" in page
    assert "proof/evaluate/report.html" in page


def test_third_party_deprecations_stay_out_of_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default")   # even where the environment asks for every warning
    warn = lambda module, text, category: (f"exec(\"import warnings; warnings.warn('{text}', {category})\", "
                                           f"{{'__name__': '{module}'}})\n")
    body = ("import warnings\n" + warn("torch.cuda.amp", "tp-future", "FutureWarning")
            + warn("monai.utils", "tp-deprecation", "DeprecationWarning")
            + warn("amalgam.data", "own-future", "FutureWarning")
            + warn("amalgam", "own-deprecation", "DeprecationWarning")
            + warn("nibabel", "tp-user", "UserWarning") + "warnings.warn('notebook-deprecation', DeprecationWarning)\n")
    out = run_notebook(tiny(tmp_path / "w.ipynb", body=body), tmp_path / "w")
    cells = nbformat.read(out / "w.ipynb", 4).cells
    stderr = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    for shown in ("own-future", "own-deprecation", "tp-user", "notebook-deprecation"):
        assert shown in stderr, (shown, stderr)
    for hidden in ("tp-future", "tp-deprecation"): assert hidden not in stderr, (hidden, stderr)
    assert "tp-user" in (out / "report.html").read_text() and "tp-future" not in (out / "report.html").read_text()


def test_check_out_dir_accepts_a_new_an_empty_and_a_previous_report(tmp_path):
    assert check_out_dir(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    report(tmp_path / "old", "nbs/experiments/data_report.ipynb", {})
    check_out_dir(tmp_path / "old")
