"""Library notebooks that keep their small printed outputs (a weight table, a mapping), so a reader on GitHub sees
them: the stored outputs must be what the notebook prints now. Re-render them after changing such a notebook:

    .venv/bin/python tests/test_notebook_outputs.py --write
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEEP_OUTPUTS = ("05_amalgamation.ipynb",)  # notebooks whose printed (stdout) outputs are committed


def fresh_outputs(name: str):
    "The notebook run top to bottom in its folder, as nbdev_test runs it; only stdout outputs kept."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    nb, cwd = read_nb(ROOT / "nbs" / name), os.getcwd()
    os.chdir(ROOT / "nbs")
    try: CaptureShell().run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type == "code":
            c["outputs"] = [{"name": "stdout", "output_type": "stream", "text": "".join(o["text"])}
                            for o in c.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stdout"]
    return nb


def _stdout(cells) -> list[str]:
    return ["".join("".join(o["text"]) for o in c.get("outputs", [])) for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", KEEP_OUTPUTS)
def test_stored_outputs_are_what_the_notebook_prints(name):
    from execnb.nbio import read_nb
    stored = _stdout(read_nb(ROOT / "nbs" / name).cells)
    assert any(stored), f"{name}: keeps no outputs; render them with `python {Path(__file__).name} --write`"
    assert stored == _stdout(fresh_outputs(name).cells), \
        f"nbs/{name}: stored outputs are stale; re-render with `python tests/{Path(__file__).name} --write`"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    from execnb.nbio import write_nb
    for name in KEEP_OUTPUTS:
        write_nb(fresh_outputs(name), ROOT / "nbs" / name)
        print("rendered", name)
