"""Bad input at the command line (issue 13): one table per command. Each row is an input, the exit code, the words the one
clear line on stderr must hold (the file and the problem), and the check that nothing was written or deleted."""
import gzip
import json
import shutil
import tracemalloc
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import amalgam.segmenter as S
import amalgam.manifests as M
from amalgam.cli import main
from amalgam.config import remove_stale_temporaries
from amalgam.phantoms import MAX_PHANTOM_CASES, phantom_manifest
from scans import itk_image, write_dicom_series
from test_infer import make_run
from test_manifests import label_array, make_raw, manifest_dict, save


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("AMALGAM_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("nnUNet_raw", raising=False)


def tree(root: Path) -> dict:
    "Every path below `root` with its size and modification time: equal before and after means nothing was written or deleted."
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def check_one_line(rc, err, code, words):
    "Exit `code`, no traceback, and one line of stderr holding every word (case-insensitive)."
    assert rc == code, err
    assert "Traceback" not in err, err
    assert any(all(w.lower() in line.lower() for w in words) for line in err.splitlines()), (words, err)


def run(argv, capsys, tmp):
    "Run `amalgam ARGV`; stderr with `tmp` shown as <tmp>, so a key word cannot match the test's own folder name."
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.replace(str(tmp), "<tmp>")


def refused(argv, words, capsys, tmp):
    "`amalgam ARGV` exits 2 with one line holding every word, and nothing below `tmp` was written or deleted."
    before = tree(tmp)
    rc, err = run(argv, capsys, tmp)
    check_one_line(rc, err, 2, words)
    assert tree(tmp) == before


# ---------------------------------------------------------------- validate

def unchecked(d, path):
    "Write a manifest as a user might, without `write_manifest`'s schema check."
    path.write_text(M._dump(d))
    return path


def _tiny(tmp):
    root = tmp / "raw_src"
    cases = make_raw(root, [f"t_{i:03d}" for i in range(4)])
    return root, cases


def v_non_utf8(tmp):
    p = tmp / "latin1.yaml"
    p.write_bytes("task: caf\xe9\n".encode("latin-1"))
    return [p], ["latin1.yaml", "UTF-8"], None


def v_absolute_path(tmp):
    root, cases = _tiny(tmp)
    cases[0]["images"][0]["path"] = "/etc/passwd"
    return [unchecked(manifest_dict(root, cases), tmp / "m.yaml")], ["m.yaml", "/etc/passwd", "inside"], "/etc/passwd"


def v_parent_path(tmp):
    root, cases = _tiny(tmp)
    outside = tmp / "x"  # root/../x: it exists, so hashing it would go unnoticed without the spy
    outside.write_bytes(b"secret")
    cases[0]["label"]["path"] = "../x"
    return [unchecked(manifest_dict(root, cases), tmp / "m.yaml")], ["m.yaml", "../x", "inside"], str(outside)


def v_symlink_escape(tmp):
    root, cases = _tiny(tmp)
    inside = root / cases[1]["label"]["path"]
    outside = tmp / "elsewhere.nii.gz"
    shutil.move(inside, outside)
    inside.symlink_to(outside)  # same bytes, so the sha256 matches: only the link gives it away
    return [M.write_manifest(manifest_dict(root, cases), tmp / "m.yaml")], [inside.name, "symlink", "outside"], None


def v_huge_phantom(tmp):
    d = phantom_manifest("mr_cardiac", n_cases=3, shape=(32, 32, 32))
    d["source"]["n_cases"] = 1_000_000
    return [unchecked(d, tmp / "phantom_big.yaml")], ["n_cases", "1000000", str(MAX_PHANTOM_CASES)], None


@pytest.mark.parametrize("make", [v_non_utf8, v_absolute_path, v_parent_path, v_symlink_escape, v_huge_phantom],
                         ids=lambda f: f.__name__)
def test_validate_bad_inputs(make, tmp_path, capsys, monkeypatch):
    argv, words, untouchable = make(tmp_path)
    touched = []
    spy = lambda real: (lambda p, *a, **k: (touched.append(str(p)), real(p, *a, **k))[1])
    monkeypatch.setattr(M, "sha256_file", spy(M.sha256_file))
    monkeypatch.setattr(M, "_read", spy(M._read))
    refused(["validate", *argv], words, capsys, tmp_path)
    if untouchable: assert not [t for t in touched if Path(t).resolve() == Path(untouchable).resolve()], touched


# ---------------------------------------------------------------- materialize

def m_raw_is_a_file(tmp):
    root, cases = _tiny(tmp)
    f = tmp / "raw_file"; f.write_text("not a folder")
    return [M.write_manifest(manifest_dict(root, cases), tmp / "m.yaml"), "--nnunet-raw", f], ["raw_file", "not a folder"]


def m_raw_below_a_file(tmp):
    argv, words = m_raw_is_a_file(tmp)
    return [*argv[:-1], argv[-1] / "nnUNet_raw"], words


def m_existing_target(tmp):
    root, cases = _tiny(tmp)
    (tmp / "raw" / "Dataset991_Tiny").mkdir(parents=True)
    (tmp / "raw" / "Dataset991_Tiny" / "keep.txt").write_text("keep")
    return [M.write_manifest(manifest_dict(root, cases), tmp / "m.yaml"), "--nnunet-raw", tmp / "raw"], ["Dataset991_Tiny", "pass --overwrite"]


def m_label_value_too_large(tmp):
    root, cases = _tiny(tmp)
    d = manifest_dict(root, cases)
    d["source"]["label_values"] = {"pz": 10**12, "tz": 2}
    return [unchecked(d, tmp / "m.yaml"), "--nnunet-raw", tmp / "raw"], ["m.yaml", "label_values", str(10**12)]


def m_symlink_escape(tmp):
    argv, words, _ = v_symlink_escape(tmp)
    return [*argv, "--nnunet-raw", tmp / "raw"], words


@pytest.mark.parametrize("make", [m_raw_is_a_file, m_raw_below_a_file, m_existing_target, m_label_value_too_large, m_symlink_escape],
                         ids=lambda f: f.__name__)
def test_materialize_bad_inputs(make, tmp_path, capsys):
    argv, words = make(tmp_path)
    refused(["materialize", *argv], words, capsys, tmp_path)


def test_materialize_remaps_large_label_values_without_a_lookup_table(tmp_path, capsys):
    "A source label value of 2·10⁹ is remapped in a few MB, not through a 2 GB lookup table."
    root, cases = _tiny(tmp_path)
    for c in cases:
        lab = label_array().astype(np.int32); lab[lab == 1] = 2_000_000_000
        c["label"] = M._ref(root, save(lab, root / c["label"]["path"]))
    d = manifest_dict(root, cases)
    d["source"]["label_values"] = {"pz": 2_000_000_000, "tz": 2}
    m = M.write_manifest(d, tmp_path / "m.yaml")
    tracemalloc.start()
    try: target = M.materialize(m, tmp_path / "raw")
    finally: peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MB"
    out = np.asarray(nib.load(next((target / "labelsTr").glob("*.nii.gz"))).dataobj)
    assert set(np.unique(out)) == {0, 1, 2}


def test_materialize_removes_its_stale_temporary_folders(tmp_path, capsys):
    "A killed materialize leaves `.Dataset*.tmp`; the next run of the same dataset removes it (others are left alone)."
    root, cases = _tiny(tmp_path)
    m = M.write_manifest(manifest_dict(root, cases), tmp_path / "m.yaml")
    stale, other = tmp_path / "raw" / ".Dataset991_Tiny.abc123.tmp", tmp_path / "raw" / ".Dataset992_Other.abc.tmp"
    for d in (stale, other): d.mkdir(parents=True); (d / "half.nii.gz").write_bytes(b"x")
    M.materialize(m, tmp_path / "raw")
    assert not stale.exists() and other.exists()
    assert "stale" in capsys.readouterr().out


def test_remove_stale_temporaries_only_matches_the_named_file(tmp_path):
    "A killed checkpoint write leaves `.last.pt.<random>.pt`; only temporaries of the named files are removed."
    for n in (".last.pt.k2j3.pt", ".model.pt.x9.pt", ".other.pt.k2.pt", "last.pt"): (tmp_path / n).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ["last.pt", "model.pt"])
    assert sorted(p.name for p in removed) == [".last.pt.k2j3.pt", ".model.pt.x9.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.k2.pt", "last.pt"]


# ---------------------------------------------------------------- phantoms

@pytest.mark.parametrize("extra, words", [(["--n-cases", "1000000"], ["n_cases", f"1..{MAX_PHANTOM_CASES}", "1000000"])],
                         ids=["n_cases_unbounded"])
def test_phantoms_bad_inputs(extra, words, tmp_path, capsys):
    refused(["phantoms", "--out", tmp_path / "manifests", "--tasks", "mr_cardiac", *extra], words, capsys, tmp_path)


# ---------------------------------------------------------------- report

def p_manifests_not_a_list(tmp):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("out_dir = None\nmanifests = None", metadata={"tags": ["parameters"]})]
    p = tmp / "tiny.ipynb"; nbformat.write(nb, p)
    return [p, tmp / "out", "-p", "manifests=5"], ["manifests", "5"]


@pytest.mark.parametrize("make", [p_manifests_not_a_list], ids=lambda f: f.__name__)
def test_report_bad_inputs(make, tmp_path, capsys):
    argv, words = make(tmp_path)
    refused(["report", *argv], words, capsys, tmp_path)


# ---------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def run3d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("bad3") / "run")


def nifti(path, shape=(20, 24, 32), **fields):
    "A float32 .nii.gz of `shape` whose header fields are then set to `fields` (the data stay those of `shape`)."
    data = np.random.default_rng(0).normal(100, 50, shape).astype(np.float32)
    hdr = nib.Nifti1Header(); hdr.set_data_shape(shape); hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.eye(4), code=2); hdr.set_qform(np.eye(4), code=0)
    for k, v in fields.items(): hdr[k] = v
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.tobytes()))
    return path


def prompts(tmp, spec=None):
    p = tmp / "prompts.json"
    p.write_text(json.dumps(spec or {"points": [[5, 5, 5]]}))
    return p


def argv(run, tmp, image, extra=(), out=None, spec=None):
    return ["predict", "-r", run, "-i", image, "-o", out or tmp / "out", "--prompts", prompts(tmp, spec), *extra]


def copy_run(run, tmp, edit):
    new = tmp / "run"; shutil.copytree(run, new)
    cfg = json.loads((new / "config.json").read_text()); edit(cfg)
    (new / "config.json").write_text(json.dumps(cfg))
    return new


def r_output_not_writable(run, tmp):
    (tmp / "blocker").write_text("a file where a folder is needed")
    return argv(run, tmp, nifti(tmp / "a.nii.gz"), out=tmp / "blocker" / "out"), ["blocker", "output"], True


def r_batch_size_zero(run, tmp):
    return argv(run, tmp, nifti(tmp / "a.nii.gz"), ["--batch-size", "0"]), ["--batch-size", "0"], True


def r_prompts_nested(run, tmp):
    a = argv(run, tmp, nifti(tmp / "a.nii.gz"))
    (tmp / "prompts.json").write_text("[" * 100_000 + "]" * 100_000)
    return a, ["prompts.json", "nested"], True


def r_config_wrong_type(run, tmp):
    new = copy_run(run, tmp, lambda c: c["model"].update(feature_size="big"))
    return argv(new, tmp, nifti(tmp / "a.nii.gz")), ["config.json", "feature_size", "big"], False


def r_config_unknown_key(run, tmp):
    new = copy_run(run, tmp, lambda c: c["data"].update(patch_sise=[8, 8, 8]))
    return argv(new, tmp, nifti(tmp / "a.nii.gz")), ["config.json", "patch_sise"], False


def r_truncated(run, tmp):
    p = nifti(tmp / "cut.nii.gz"); p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return argv(run, tmp, p), ["cut.nii.gz", "truncated"], False


def r_header_5000_cubed(run, tmp):
    p = nifti(tmp / "huge.nii.gz", dim=[3, 5000, 5000, 5000, 1, 1, 1, 1])
    return argv(run, tmp, p), ["huge.nii.gz", "5000", "--max-voxels"], False


def r_over_voxel_flag(run, tmp):
    return argv(run, tmp, nifti(tmp / "a.nii.gz"), ["--max-voxels", "1000"]), ["a.nii.gz", "15360", "--max-voxels"], False


def r_singular_affine(run, tmp):
    return argv(run, tmp, nifti(tmp / "flat.nii.gz", srow_z=[0, 0, 0, 0])), ["flat.nii.gz", "singular"], False


def r_nan_affine(run, tmp):
    return argv(run, tmp, nifti(tmp / "nan.nii.gz", srow_x=[np.nan, 0, 0, 0])), ["nan.nii.gz", "affine", "NaN"], False


def r_zero_axis(run, tmp):
    p = nifti(tmp / "empty.nii.gz", dim=[3, 0, 24, 32, 1, 1, 1, 1])
    return argv(run, tmp, p), ["empty.nii.gz", "axis 0 has zero size", "(0, 24, 32)"], False


def _scan(shape=(20, 24, 32)):
    return itk_image(np.zeros(shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))


def r_dicom_two_series(run, tmp):
    write_dicom_series(_scan(), tmp / "dicom", "1.2.826.0.1.3680043.2.1125.9001")
    write_dicom_series(_scan(), tmp / "dicom", "1.2.826.0.1.3680043.2.1125.9002")
    return argv(run, tmp, tmp / "dicom"), ["dicom", "2 DICOM series", "one series"], False


def r_vector_nrrd(run, tmp):
    sitk.WriteImage(sitk.Compose([sitk.Cast(_scan(), sitk.sitkFloat32)] * 3), str(tmp / "field.nrrd"))
    return argv(run, tmp, tmp / "field.nrrd"), ["field.nrrd", "vector image", "3 components"], False


def r_world_prompt_outside_nrrd(run, tmp):
    sitk.WriteImage(_scan(), str(tmp / "scan.nrrd"))
    spec = {"coordinate_system": "world", "points": [[0.0, 0.0, 500.0]]}
    return argv(run, tmp, tmp / "scan.nrrd", spec=spec), ["scan.nrrd", "[0.0, 0.0, 500.0]", "world", "outside"], False


def r_folder_without_scans(run, tmp):
    (tmp / "notes").mkdir(); (tmp / "notes" / "readme.txt").write_text("no scans here")
    return argv(run, tmp, tmp / "notes"), ["notes", "no image files", "no DICOM series"], True


@pytest.mark.parametrize("make", [r_output_not_writable, r_batch_size_zero, r_prompts_nested, r_config_wrong_type,
                                  r_config_unknown_key, r_truncated, r_header_5000_cubed, r_over_voxel_flag,
                                  r_singular_affine, r_nan_affine, r_zero_axis, r_dicom_two_series, r_vector_nrrd,
                                  r_world_prompt_outside_nrrd, r_folder_without_scans], ids=lambda f: f.__name__)
def test_predict_bad_inputs(make, run3d, tmp_path, capsys, monkeypatch):
    args, words, before_model = make(run3d, tmp_path)
    if before_model:  # these must be refused before the (slow, large) model is loaded
        monkeypatch.setattr(S, "load_run", lambda *a, **k: pytest.fail("the model was loaded before the input was checked"))
    refused(args, words, capsys, tmp_path)
