"Tests of amalgam.manifests: schema and file validation, sources (msd, nnunet_raw, folder, pip_sdist), materialise, datalist."
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import amalgam.manifests as M
from amalgam.config import AmalgamError, atomic_write, manifests_dir, repo_root, sha256_file

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    "Locks, caches and nnU-Net folders go to a per-test workspace."
    monkeypatch.setenv("AMALGAM_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("AMALGAM_MSD_DIR", raising=False)


def save(arr, path, affine=AFFINE):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def label_array(shape=(12, 10, 8)):
    lab = np.zeros(shape, np.uint8); lab[2:6, 2:6, 2:5] = 1; lab[6:9, 3:7, 3:6] = 2
    return lab


def ref(root, p): return {"path": Path(p).relative_to(root).as_posix(), "sha256": sha256_file(p)}


def make_raw(root, ids, n_channels=2, shape=(12, 10, 8)):
    "An nnU-Net-layout folder with random images and two-label masks; returns the manifest case entries."
    g, cases = np.random.default_rng(0), []
    for cid in ids:
        imgs = [save(g.normal(size=shape).astype(np.float32), root / "imagesTr" / f"{cid}_{c:04d}.nii.gz") for c in range(n_channels)]
        lab = save(label_array(shape), root / "labelsTr" / f"{cid}.nii.gz")
        cases.append({"id": cid, "images": [ref(root, i) for i in imgs], "label": ref(root, lab)})
    return cases


def manifest_dict(root, cases, **over):
    ids = [c["id"] for c in cases]
    d = {"schema_version": 1, "task": "tiny", "description": "tiny test data", "dataset_id": 991, "dataset_name": "Tiny",
         "modality": "MR", "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "pz": 1, "tz": 2},
         "file_ending": ".nii.gz", "label_quality": "synthetic", "licence": "CC0-1.0", "provenance": "made by the test",
         "source": {"kind": "nnunet_raw", "path": str(root)}, "cases": cases,
         "split": {"seed": 0, "fractions": FRACTIONS, **M.split_cases(ids, 0, FRACTIONS)}}
    d.update(over)
    return d


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "raw_src"
    cases = make_raw(root, [f"t_{i:03d}" for i in range(4)])
    return root, M.write_manifest(manifest_dict(root, cases), tmp_path / "tiny.yaml")


# ---------------------------------------------------------------- validation

def test_ten_planted_faults_all_reported_with_their_file(tmp_path):
    root = tmp_path / "src"
    ids = [f"c_{i}" for i in range(8)]
    cases = make_raw(root, ids)
    p = lambda rel: str(root / rel)
    img, lab = lambda i, c: root / "imagesTr" / f"c_{i}_{c:04d}.nii.gz", lambda i: root / "labelsTr" / f"c_{i}.nii.gz"
    g = np.random.default_rng(1)
    # 2. missing file
    img(0, 1).unlink()
    # 3. image/label shape mismatch
    save(label_array((12, 10, 9)), lab(1))
    # 4. affine mismatch between channels
    save(g.normal(size=(12, 10, 8)).astype(np.float32), img(2, 1), affine=np.diag([1.5, 1.5, 2.5, 1.0]))
    # 5. label value not in the label map
    bad = label_array(); bad[0, 0, 0] = 5; save(bad, lab(3))
    # 6. non-finite voxels
    nan = g.normal(size=(12, 10, 8)).astype(np.float32); nan[1, 1, 1] = np.nan; save(nan, img(4, 0))
    # 7. empty foreground
    save(np.zeros((12, 10, 8), np.uint8), lab(5))
    for i in (1, 2, 3, 4, 5):  # only the planted fault, not a stale checksum, should be reported for these
        cases[i] = {"id": f"c_{i}", "images": [ref(root, img(i, c)) for c in (0, 1)], "label": ref(root, lab(i))}
    # 9. checksum mismatch
    cases[7]["images"][0]["sha256"] = "0" * 64
    d = manifest_dict(root, cases)
    # 1. misspelt key
    d["licnece"] = d.pop("licence")
    # 8. duplicate case id
    cases[6]["id"] = "c_5"
    d["split"] = {"seed": 0, "fractions": FRACTIONS, **{s: sorted(set(v) - {"c_6"}) for s, v in M.split_cases(ids, 0, FRACTIONS).items()}}
    # 10. split lists that do not partition the cases: one case in two splits
    d["split"]["val"] = sorted(d["split"]["val"] + [d["split"]["train"][0]])
    mpath = tmp_path / "faulty.yaml"
    atomic_write(mpath, yaml.safe_dump(d, sort_keys=False))

    problems = M.validate(mpath)
    for pr in problems: print(pr)
    expected = [(str(mpath), "unknown key 'licnece' (did you mean 'licence'?)"), (str(mpath), "missing required key 'licence'"),
                (str(mpath), "duplicate case id 'c_5'"), (str(mpath), "in more than one split"),
                (p("imagesTr/c_0_0001.nii.gz"), "missing file"), (p("labelsTr/c_1.nii.gz"), "shape (12, 10, 9) differs"),
                (p("imagesTr/c_2_0001.nii.gz"), "affine differs"), (p("labelsTr/c_3.nii.gz"), "label value(s) [5] not in the labels map"),
                (p("imagesTr/c_4_0000.nii.gz"), "1 non-finite voxel"), (p("labelsTr/c_5.nii.gz"), "empty foreground"),
                (p("imagesTr/c_7_0000.nii.gz"), "sha256 mismatch")]
    # the misspelt key gives two problems (unknown key + missing key): 10 faults, 11 problems, nothing else
    assert len(problems) == len(expected)
    for file, text in expected:
        assert any(pr.file == file and text in pr.problem for pr in problems), (file, text)
    with pytest.raises(M.ManifestError) as e: M.raise_if_problems(problems, str(mpath))
    assert len(e.value.problems) == 11 and isinstance(e.value, AmalgamError)


def test_schema_problems(tmp_path, tiny):
    root, mpath = tiny
    d = yaml.safe_load(mpath.read_text())
    d.update(dataset_id=1000, task="Bad-Task", labels={"background": 1, "pz": 0, "tz": 3}, label_quality="silverr")
    d["cases"][0]["images"][0]["sha256"] = "xyz"
    d["split"]["fractions"] = {"train": 0.9, "val": 0.3}
    d["source"]["kindd"] = 1
    with pytest.raises(M.ManifestError) as e: M.write_manifest(d, tmp_path / "bad.yaml")
    msg = str(e.value)
    for text in ("1..999", "[a-z0-9_]+", "'background' must be 0", "consecutive", "did you mean 'silver'", "64 lower-case hex",
                 "summing to 1", "unknown key 'kindd'"):
        assert text in msg, text
    assert not (tmp_path / "bad.yaml").exists()
    atomic_write(tmp_path / "dup.yaml", mpath.read_text() + "task: again\n")
    with pytest.raises(AmalgamError, match="duplicate key 'task'"): M.load_manifest(tmp_path / "dup.yaml")


def test_split_lists_must_be_the_seeded_split(tmp_path, tiny):
    root, mpath = tiny
    d = yaml.safe_load(mpath.read_text())
    d["split"]["train"], d["split"]["test"] = d["split"]["test"], d["split"]["train"]
    atomic_write(tmp_path / "swapped.yaml", yaml.safe_dump(d, sort_keys=False))
    assert any("differ from split_cases" in p.problem for p in M.validate(tmp_path / "swapped.yaml", check_files=False))


@pytest.mark.parametrize("path", sorted(manifests_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_manifest_loads_and_passes_schema(path):
    m = M.load_manifest(path)   # raises on any schema problem
    assert m.task in path.stem and m.dataset_folder_name.startswith(f"Dataset{m.dataset_id:03d}_")


def test_shipped_manifests_are_distinct_and_complete():
    ms = [M.load_manifest(p) for p in sorted(manifests_dir().glob("*.yaml"))]
    names = {m.task for m in ms}
    assert {"msd_heart", "msd_hippocampus", "msd_prostate", "msd_spleen", "totalseg_ct_abdomen", "totalseg_mr_abdomen"} <= names
    assert len(names) == len(ms) and len({m.dataset_id for m in ms}) == len(ms)
    prostate = M.load_manifest(manifests_dir() / "msd_prostate.yaml")
    assert prostate.channel_names == {"0": "T2", "1": "ADC"} and prostate.labels == {"background": 0, "PZ": 1, "TZ": 2}
    assert {m.dataset_id for m in ms if m.task.startswith("msd_")} == {2, 4, 5, 9}
    assert all(m.label_quality == "silver" and "SILVER" in m.provenance for m in ms if m.task.startswith("totalseg_"))


# ---------------------------------------------------------------- materialise

def test_materialize_writes_nnunet_layout_and_is_idempotent(tmp_path, tiny, capsys):
    root, mpath = tiny
    m = M.load_manifest(mpath)
    ds = M.materialize(mpath, tmp_path / "nnUNet_raw")
    assert ds == tmp_path / "nnUNet_raw" / "Dataset991_Tiny"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["numTraining"] == len(m.split["train"]) + len(m.split["val"]) and dj["amalgam_manifest_sha256"] == m.sha256
    for cid in m.split["test"]:
        assert (ds / "imagesTs" / f"{cid}_0001.nii.gz").is_file() and (ds / "labelsTs" / f"{cid}.nii.gz").is_file()
    for cid in m.split["train"] + m.split["val"]:
        assert sha256_file(ds / "imagesTr" / f"{cid}_0000.nii.gz") == m.case(cid).images[0].sha256
    stamps = {p: p.stat().st_mtime_ns for p in ds.rglob("*")}
    capsys.readouterr()
    assert M.materialize(mpath, tmp_path / "nnUNet_raw") == ds
    assert "nothing changed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == stamps
    # a changed file in the dataset is noticed: refuse without overwrite, repair with it
    victim = ds / "labelsTr" / f"{m.split['train'][0]}.nii.gz"
    victim.write_bytes(b"garbage")
    with pytest.raises(AmalgamError, match="overwrite=True"): M.materialize(mpath, tmp_path / "nnUNet_raw")
    M.materialize(mpath, tmp_path / "nnUNet_raw", overwrite=True)
    assert sha256_file(victim) == m.case(m.split["train"][0]).label.sha256


def test_materialize_is_atomic(tmp_path, tiny, monkeypatch):
    root, mpath = tiny
    real, calls = M._write_case, []
    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(M, "_write_case", failing)
    with pytest.raises(RuntimeError, match="disk full"): M.materialize(mpath, tmp_path / "nnUNet_raw")
    assert list((tmp_path / "nnUNet_raw").iterdir()) == []  # neither the dataset nor its temporary folder is left


def test_materialize_refuses_invalid_files(tmp_path, tiny):
    root, mpath = tiny
    save(np.full((12, 10, 8), 9, np.uint8), root / "labelsTr" / "t_001.nii.gz")
    with pytest.raises(M.ManifestError) as e: M.materialize(mpath, tmp_path / "nnUNet_raw")
    assert {p.file for p in e.value.problems} == {str(root / "labelsTr" / "t_001.nii.gz")}
    assert not (tmp_path / "nnUNet_raw" / "Dataset991_Tiny").exists()


def test_datalist(tmp_path, tiny):
    root, mpath = tiny
    m = M.load_manifest(mpath)
    with pytest.raises(AmalgamError, match="run materialize"): M.datalist(m, "train", tmp_path / "nowhere")
    ds = M.materialize(m, tmp_path / "nnUNet_raw")
    dl = M.datalist(m, "train", ds)
    assert [d["case_id"] for d in dl] == m.split["train"]
    assert all(len(d["image"]) == 2 and Path(d["label"]).is_file() and d["task"] == "tiny" for d in dl)
    one = M.write_manifest({**manifest_dict(root, [{**c, "images": c["images"][:1]} for c in yaml.safe_load(mpath.read_text())["cases"]]),
                            "channel_names": {"0": "T2"}, "dataset_id": 992}, tmp_path / "one.yaml")
    ds1 = M.materialize(one, tmp_path / "nnUNet_raw")
    assert isinstance(M.datalist(one, "test", ds1)[0]["image"], str)


# ---------------------------------------------------------------- sources

def test_folder_source_pins_on_first_use(tmp_path, monkeypatch):
    src, g = tmp_path / "folder", np.random.default_rng(0)
    for s in ("sub01", "sub02", "sub03", "sub04"):
        for ch in ("t2", "adc"): save(g.normal(size=(9, 8, 7)).astype(np.float32), src / s / f"{s}_{ch}.nii.gz")
        save(label_array((9, 8, 7)), src / s / f"{s}_seg.nii.gz")
    d = manifest_dict(src, [], task="tiny_folder", dataset_id=993, pin="first_use",
                      source={"kind": "folder", "env": "TINY_FOLDER", "images": ["*/*_t2.nii.gz", "*/*_adc.nii.gz"],
                              "label": "*/*_seg.nii.gz", "case_id": r"(?P<id>sub\d+)_"},
                      split={"seed": 0, "fractions": FRACTIONS})
    del d["cases"]
    mpath = M.write_manifest(d, tmp_path / "tiny_folder.yaml")
    assert "not pinned" in M.validate(mpath)[0].problem
    with pytest.raises(AmalgamError, match="TINY_FOLDER"): M.materialize(mpath, tmp_path / "nnUNet_raw")
    os.environ["TINY_FOLDER"] = str(src)
    try: ds = M.materialize(mpath, tmp_path / "nnUNet_raw")
    finally: del os.environ["TINY_FOLDER"]
    m = M.load_manifest(mpath)
    assert [c.id for c in m.cases] == ["sub01", "sub02", "sub03", "sub04"] and m.lock_path.is_file()
    assert m.case("sub03").images[1].path == "sub03/sub03_adc.nii.gz"
    assert (ds / "imagesTr" / f"{m.split['train'][0]}_0001.nii.gz").is_file()
    # an incomplete case is named
    (src / "sub02" / "sub02_adc.nii.gz").unlink(); m.lock_path.unlink()
    with pytest.raises(AmalgamError, match=r"\['sub02'\] lack a label or a channel"):
        M.materialize(mpath, tmp_path / "nnUNet_raw2", source_options={"path": str(src)})
    # a discovered file that links out of the source folder is refused before it is read or hashed
    save(g.normal(size=(9, 8, 7)).astype(np.float32), src / "sub02" / "sub02_adc.nii.gz")
    (src / "sub02").rename(tmp_path / "elsewhere"); (src / "sub02").symlink_to(tmp_path / "elsewhere")
    hashed = []
    monkeypatch.setattr(M, "sha256_file", lambda f, _real=M.sha256_file: hashed.append(Path(f)) or _real(f))
    with pytest.raises(AmalgamError, match="sub02_.*outside the source folder"):
        M.materialize(mpath, tmp_path / "nnUNet_raw3", source_options={"path": str(src)})
    assert hashed and not any("elsewhere" in str(f.resolve()) for f in hashed), hashed
    assert not m.lock_path.exists() and not (tmp_path / "nnUNet_raw3").exists()


def make_msd_task(parent, name="Task05_Prostate", n=4, channels=("T2", "ADC"), labels=("PZ", "TZ"), shape=(10, 9, 6)):
    "A tiny MSD-format task folder: 4D multi-channel images (3D for one channel), MSD dataset.json with training/test lists."
    task, g = Path(parent) / name, np.random.default_rng(0)
    training, test = [], []
    for i in range(n):
        img = g.normal(size=(*shape, len(channels)) if len(channels) > 1 else shape).astype(np.float32)
        save(img, task / f"imagesTr/case_{i:02d}.nii.gz", np.diag([0.6, 0.6, 3.0, 1.0]))
        save(label_array(shape) if len(labels) > 1 else (label_array(shape) > 0).astype(np.uint8), task / f"labelsTr/case_{i:02d}.nii.gz", np.diag([0.6, 0.6, 3.0, 1.0]))
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    save(g.normal(size=(*shape, len(channels))).astype(np.float32), task / "imagesTs/case_99.nii.gz", np.diag([0.6, 0.6, 3.0, 1.0]))
    test.append("./imagesTs/case_99.nii.gz")
    (task / "._case_00.nii.gz").write_bytes(b"\x00\x05macOS resource fork")  # as in the official tars
    (task / "dataset.json").write_text(json.dumps({
        "name": name.split("_")[1].upper(), "description": "tiny", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D",
        "modality": {str(i): c for i, c in enumerate(channels)}, "labels": {"0": "background", **{str(i + 1): l for i, l in enumerate(labels)}},
        "numTraining": n, "numTest": 1, "training": training, "test": test}))
    return task


def msd_manifest(tmp_path, task="prostate", n=4):
    d = yaml.safe_load((manifests_dir() / f"msd_{task}.yaml").read_text())
    d["source"]["num_training"] = n  # the shipped manifest pins the release's count; our tiny copy has fewer
    return M.write_manifest(d, tmp_path / f"msd_{task}.yaml")


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar"])
def test_msd_prostate_two_channels(tmp_path, packed):
    task = make_msd_task(tmp_path / "msd")
    if packed:
        with tarfile.open(tmp_path / "msd" / "Task05_Prostate.tar", "w") as tf: tf.add(task, arcname="Task05_Prostate")
        shutil.rmtree(task)
    mpath = msd_manifest(tmp_path)
    with pytest.raises(AmalgamError, match="AMALGAM_MSD_DIR"): M.materialize(mpath, tmp_path / "nnUNet_raw")
    os.environ["AMALGAM_MSD_DIR"] = str(tmp_path / "msd")  # the folder holding Task05_Prostate/ or Task05_Prostate.tar
    try: ds = M.materialize(mpath, tmp_path / "nnUNet_raw")
    finally: del os.environ["AMALGAM_MSD_DIR"]
    assert ds.name == "Dataset005_Prostate"
    m = M.load_manifest(mpath)
    assert m.pinned and [c.id for c in m.cases] == [f"case_{i:02d}" for i in range(4)]
    assert sum(map(len, m.split.values())) == 4 and m.split == M.split_cases([c.id for c in m.cases], 0, m.split_fractions)
    lock = yaml.safe_load(m.lock_path.read_text())
    assert lock["task"] == "msd_prostate" and len(lock["cases"][0]["images"]) == 2
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"} and dj["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert dj["amalgam_lock_sha256"] == sha256_file(m.lock_path)
    # channel 1 is the ADC volume nnU-Net's converter split out of the 4D image
    cid = m.split["train"][0]
    adc = np.asanyarray(nib.load(str(ds / "imagesTr" / f"{cid}_0001.nii.gz")).dataobj)
    assert adc.shape == (10, 9, 6)
    if not packed:
        np.testing.assert_allclose(adc, np.asanyarray(nib.load(str(task / f"imagesTr/{cid}.nii.gz")).dataobj)[..., 1])
    # later runs verify against the lock: a changed converted file is caught
    assert M.validate(mpath) == []
    conv = Path(lock["root"]) / "labelsTr" / f"{cid}.nii.gz"
    save(np.ones((10, 9, 6), np.uint8), conv, np.diag([0.6, 0.6, 3.0, 1.0]))
    problems = M.validate(mpath)
    assert [p.file for p in problems] == [str(conv)] and "sha256 mismatch" in problems[0].problem


def test_msd_single_channel_and_metadata_checks(tmp_path):
    make_msd_task(tmp_path / "msd", "Task04_Hippocampus", n=3, channels=("MRI",), labels=("Anterior", "Posterior"))
    ds = M.materialize(msd_manifest(tmp_path, "hippocampus", 3), tmp_path / "nnUNet_raw", source_options={"path": str(tmp_path / "msd")})
    assert ds.name == "Dataset004_Hippocampus" and len(list((ds / "imagesTr").iterdir())) + len(list((ds / "imagesTs").iterdir())) == 3
    # the release's case count and the label names are checked
    make_msd_task(tmp_path / "msd2", "Task09_Spleen", n=2, channels=("CT",), labels=("liver",))
    with pytest.raises(AmalgamError, match="lists 2 training cases, the MSD release of Task09_Spleen has 41"):
        M.materialize(manifests_dir() / "msd_spleen.yaml", tmp_path / "nnUNet_raw", source_options={"path": str(tmp_path / "msd2")})
    with pytest.raises(AmalgamError, match="labels .* differ from the manifest's"):
        M.materialize(msd_manifest(tmp_path, "spleen", 2), tmp_path / "nnUNet_raw", source_options={"path": str(tmp_path / "msd2")})


def test_safe_extract_refuses_path_traversal(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload.txt"; payload.write_text("x")
    with tarfile.open(evil, "w") as tf: tf.add(payload, arcname="../../escaped.txt")
    with pytest.raises(AmalgamError, match="refused unsafe member"): M.safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_pip_sdist_checks_archive_sha256(tmp_path, monkeypatch):
    calls = []
    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "pkg-1.0.tar.gz", "w:gz") as tf: tf.add(__file__, arcname="pkg-1.0/x.py")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(M.subprocess, "run", fake_pip)
    with pytest.raises(AmalgamError, match="differs from the manifest's source.sha256"):
        M.pip_sdist_source({"kind": "pip_sdist", "name": "pkg", "version": "1.0", "sha256": "a" * 64}, tmp_path / "cache")
    assert calls[0][1:9] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "pkg==1.0", "-d"]
    assert not (tmp_path / "cache" / "pkg-1.0" / "archive" / "pkg-1.0.tar.gz").exists()


# ---------------------------------------------------------------- nnU-Net and real data

@pytest.mark.slow
def test_materialised_dataset_passes_nnunet_verify_dataset_integrity(tmp_path):
    make_msd_task(tmp_path / "msd", n=4)
    ds = M.materialize(msd_manifest(tmp_path), tmp_path / "nnUNet_raw", source_options={"path": str(tmp_path / "msd")})
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "nnUNet_raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    r = subprocess.run([str(exe), "-d", "5", "--verify_dataset_integrity", "--no_pp", "-npfp", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "pre" / ds.name / "nnUNetPlans.json").is_file()
    # nnU-Net's check is not vacuous: the same function refuses the dataset once a label file is gone
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    next((ds / "labelsTr").iterdir()).unlink()
    with pytest.raises(AssertionError, match="label file"): verify_dataset_integrity(str(ds), num_processes=1)


SDIST_CACHE = (repo_root(Path(__file__).parent) or Path(__file__).parents[1]) / "workspace" / "sources" / "pip_sdist"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["totalseg_ct_abdomen", "totalseg_mr_abdomen"])
def test_totalsegmentator_manifests_materialise_from_pypi(tmp_path, task, capsys):
    "Downloads totalsegmentator-2.18.0.tar.gz (38 MB) from PyPI once into <repo>/workspace/sources/pip_sdist; later runs reuse it."
    m = M.load_manifest(manifests_dir() / f"{task}.yaml")
    t0 = time.time()
    root = M.source_root(m, cache_dir=SDIST_CACHE)
    print(f"sdist ready in {time.time() - t0:.1f} s")
    assert M.validate(m, root=root) == []  # every listed sha256 verified
    ds = M.materialize(m, tmp_path / "nnUNet_raw", cache_dir=SDIST_CACHE)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["amalgam_label_quality"] == "silver" and dj["labels"] == m.labels
    for case in m.cases:
        src = np.asanyarray(nib.load(str(root / case.label.path)).dataobj)
        out = np.asanyarray(nib.load(str(ds / "labelsTr" / f"{case.id}.nii.gz")).dataobj)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= set(m.labels.values())
        for name, v in m.source["label_values"].items():  # every organ kept, voxel for voxel, under its new value
            np.testing.assert_array_equal(out == m.labels[name], src == v)
        assert ((out > 0) == np.isin(src, list(m.source["label_values"].values()))).all()
        assert sha256_file(ds / "imagesTr" / f"{case.id}_0000.nii.gz") == case.images[0].sha256
    capsys.readouterr()
    M.materialize(m, tmp_path / "nnUNet_raw", cache_dir=SDIST_CACHE)
    assert "nothing changed" in capsys.readouterr().out
    # a wrong checksum in the manifest stops materialisation and names the file
    d = yaml.safe_load((manifests_dir() / f"{task}.yaml").read_text())
    d["cases"][0]["label"]["sha256"] = "f" * 64
    bad = tmp_path / f"{task}.yaml"; atomic_write(bad, yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(M.ManifestError) as e: M.materialize(bad, tmp_path / "other_raw", cache_dir=SDIST_CACHE)
    assert [p.file for p in e.value.problems] == [str(root / d["cases"][0]["label"]["path"])]


def test_malformed_source_is_reported_not_raised(tmp_path):
    text = (manifests_dir() / "phantom_mr_brain.yaml").read_text()
    bad = tmp_path / "nokind.yaml"
    bad.write_text(text.replace("  kind: phantom\n", ""))
    problems = M.validate(bad)
    assert problems and all(p.file == str(bad) for p in problems), problems
    assert any("kind" in p.problem for p in problems), problems
    m = M.load_manifest(manifests_dir() / "phantom_mr_brain.yaml")
    with pytest.raises(AmalgamError, match="no case 'nope'"): m.case("nope")
    with pytest.raises(AmalgamError, match="in no split"): m.split_of("nope")
