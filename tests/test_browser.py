"""The demo notebook in a real browser: JupyterLab on localhost, the system's headless Chromium driven by Playwright (no browser
download), run all cells, click the image inside the liver, press run, and check the mask overlay and the widget's readout against
the same segmentation computed here. A tiny KA²ER run (3 training steps, one random-init nnU-Net expert) stands in for `make demo`'s.
The screenshot is kept in tests/artifacts/."""
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pytest
from papermill.iorw import load_notebook_node
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright
from papermill.parameterize import parameterize_notebook
from scipy.ndimage import distance_transform_edt

from amalgam.data import DataConfig, task_classes
from amalgam.experts import ExpertBank, save_model_folder
from amalgam.predict import load_volume
from amalgam.segmenter import Segmenter
from amalgam.losses import LossConfig
from amalgam.manifests import datalist, materialize, write_manifest
from amalgam.model import KA2ERConfig
from amalgam.phantoms import phantom_manifest
from amalgam.train import TrainConfig, train
from tiny_experts import tiny_test_expert

CHROMIUM = Path("/usr/bin/chromium")
DEMO = Path(__file__).parents[1] / "nbs" / "experiments" / "demo.ipynb"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(`apt-get install -y chromium`; `make test` installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server on 127.0.0.1 with a random token, serving an empty folder, its config and state kept apart from the user's."
    root = tmp_path_factory.mktemp("lab")
    state = tmp_path_factory.mktemp("lab_state")
    # No "official Jupyter news" prompt over the page (and no request for it); every cell kept in the page, not only those in view.
    for plugin, value in {"apputils-extension/notification": {"fetchNews": "false"}, "notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = state / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_DATA_DIR": str(state / "data"),
           "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"), "IPYTHONDIR": str(state / "ipython")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = state / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        yield {"root": root, "url": url, "token": token, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def wait_for_server(lab, timeout=90):
    t0 = time.time()
    while True:
        if lab["proc"].poll() is not None: pytest.fail(f"JupyterLab exited ({lab['proc'].returncode}):\n{lab['log'].read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{lab['url']}/api/status?token={lab['token']}", timeout=2): return
        except OSError:
            if time.time() - t0 > timeout: pytest.fail(f"JupyterLab did not answer in {timeout} s:\n{lab['log'].read_text()[-3000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    "A phantom abdomen task materialised under a workspace, and a KA²ER run trained on it for 3 steps with one tiny expert."
    d = tmp_path_factory.mktemp("demo")
    manifest = write_manifest(phantom_manifest("ct_abdomen", n_cases=4, shape=(64, 64, 24)), d / "ct_abdomen.yaml")
    raw = d / "workspace" / "nnUNet_raw"
    materialize(manifest, nnunet_raw=raw, cache_dir=d / "cache")
    expert = tiny_test_expert(2, num_classes=4, name="ct_abdomen", seed=0)
    folder = save_model_folder(expert, d / "experts" / "ct_abdomen")
    model = KA2ERConfig(spatial_dims=2, feature_size=12, hidden_dim=32, num_heads=4, transformer_dim=32, iou_head_hidden_dim=32,
                        mask_in_chans=8, tasks=task_classes([manifest]))
    train(d / "run", [manifest], model, DataConfig(spatial_dims=2, patch_size=(64, 64), batch_size=2, seed=0),
          TrainConfig(steps=3, warmup_steps=1, checkpoint_every=3, log_every=1), LossConfig(), ExpertBank([expert]),
          [{"name": "ct_abdomen", "task": "ct_abdomen", "folder": str(folder), "fold": 0, "labels": dict(expert.labels)}],
          progress=False, root=raw)
    case = datalist(manifest, "test", root=raw / "Dataset501_PhantomCTAbdomen")[0]
    return {"manifest": manifest, "workspace": d / "workspace", "run": d / "run", "case": case}


def plot_point(page, row: int, col: int) -> tuple[float, float]:
    "Page coordinates of the centre of pixel (row, col) in the widget's slice figure (plotly's own axis mapping)."
    return tuple(page.evaluate("""([r, c]) => {
        const gd = document.querySelector('.amalgam-prompt-segmenter .js-plotly-plot');
        const fl = gd._fullLayout, box = gd.getBoundingClientRect();  // _offset: where an axis starts, after domain constraints
        return [box.left + fl.xaxis._offset + fl.xaxis.l2p(c), box.top + fl.yaxis._offset + fl.yaxis.l2p(r)]; }""", [row, col]))


def readout(page) -> str: return page.inner_text(".amalgam-readout")


def kernel_idle(lab) -> bool:
    with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r: sessions = json.load(r)
    return any(s["path"].endswith("demo.ipynb") and s["kernel"]["execution_state"] == "idle" for s in sessions)


def run_all_cells(page, lab, timeout=60):
    "Run > Run All Cells once the notebook's kernel is idle; asked again if the page had not wired the kernel yet (no cell started)."
    t0 = time.time()
    while True:
        while not kernel_idle(lab):
            if time.time() - t0 > timeout: pytest.fail(f"the demo notebook's kernel was not idle after {timeout} s")
            time.sleep(0.5)
        page.click(".lm-MenuBar-item:has-text('Run')")
        page.click("li[data-command='runmenu:run-all']")
        try:
            page.wait_for_function("Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
                                   ".some(e => /\\[(\\*|\\d+)\\]/.test(e.innerText))", timeout=10_000)
            return
        except PlaywrightTimeout:
            if time.time() - t0 > timeout: raise


def test_demo_notebook_in_a_browser(lab, demo_run):
    nb = parameterize_notebook(load_notebook_node(str(DEMO)), {
        "run_dir": str(demo_run["run"]), "manifest": str(demo_run["manifest"]), "case": demo_run["case"]["case_id"],
        "workspace": str(demo_run["workspace"]), "mask_path": str(lab["root"] / "mask.nii.gz")})
    nbformat.write(nb, lab["root"] / "demo.ipynb")
    wait_for_server(lab)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser_demo.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        try:
            page.goto(f"{lab['url']}/lab/tree/demo.ipynb?token={lab['token']}")
            run_all_cells(page, lab)
            page.wait_for_selector(".amalgam-prompt-segmenter .js-plotly-plot .heatmaplayer", state="attached", timeout=90_000)
            page.locator(".amalgam-prompt-segmenter .js-plotly-plot").first.scroll_into_view_if_needed()
            page.wait_for_function("document.querySelector('.amalgam-readout') && "
                                   "document.querySelector('.amalgam-readout').innerText.includes('view: axis 0')", timeout=30_000)
            index = int(re.search(r"view: axis 0, slice (\d+)", readout(page)).group(1))

            # The deepest pixel of the liver on the slice the widget opened on.
            label = np.asarray(nib.load(demo_run["case"]["label"]).dataobj).transpose(2, 1, 0)
            liver = label[index] == 1
            assert liver.any(), f"the demo opened on slice {index}, which has no liver"
            row, col = map(int, np.unravel_index(np.argmax(distance_transform_edt(liver)), liver.shape))
            x, y = plot_point(page, row, col)
            page.mouse.move(x, y)
            page.mouse.click(x, y)
            page.wait_for_function(f"document.querySelector('.amalgam-readout').innerText.includes('last point (voxel): ({index}, {row}, {col})')",
                                   timeout=20_000)

            page.click(".amalgam-prompt-segmenter button:has-text('run')")
            page.wait_for_function("/mask: \\d+ voxels/.test(document.querySelector('.amalgam-readout').innerText)", timeout=60_000)
            n = int(re.search(r"mask: (\d+) voxels", readout(page)).group(1))
            overlay = page.evaluate("""() => {
                const [gd, weights] = document.querySelectorAll('.amalgam-prompt-segmenter .js-plotly-plot');
                const count = z => z ? Array.from(z).reduce((s, row) => s + Array.from(row).filter(v => v > 0).length, 0) : 0;
                return {mask: count(gd.data.find(t => t.name === 'mask').z), weights: count(weights.data[0].z),
                        images: gd.querySelectorAll('.heatmaplayer image').length}; }""")

            # A box dragged in box mode, from the pixel 4 rows up / 5 columns left of the click to 3 down / 6 right.
            page.click(".amalgam-prompt-segmenter button:text-is('box')")
            page.wait_for_function("document.querySelector('.amalgam-prompt-segmenter .js-plotly-plot')._fullLayout.dragmode === 'select'")
            (x0, y0), (x1, y1) = plot_point(page, row - 4, col - 5), plot_point(page, row + 3, col + 6)
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x1, y1, steps=8)
            page.mouse.up()
            box = f"box ({index}, {row - 4}, {col - 5})–({index}, {row + 3}, {col + 6})"
            page.wait_for_function(f"document.querySelector('.amalgam-readout').innerText.includes('{box}')", timeout=20_000)
        finally:
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            browser.close()

    # The same prompt through the Segmenter here: the widget sent the clicked voxel and shows the model's answer.
    segmenter = Segmenter.from_run(demo_run["run"])
    volume = load_volume(demo_run["case"]["image"], segmenter.data_config, task="ct_abdomen")
    expected = segmenter.segment(volume.volume, points=[[index, row, col]], point_labels=[1]).mask
    assert n > 0, "the readout reports an empty mask"
    assert n == int(expected.sum())
    assert overlay["mask"] == int(expected[index].sum()) > 0, overlay
    assert overlay["images"] >= 2 and overlay["weights"] > 0, overlay  # image and mask layers drawn; the weight map is shown
