"""Nothing lost, every failure explained (issue #20): bad inputs of every kind through the command
line, each answered by ONE line ``lckd-kit <command>: error: ...`` (exit 2, no traceback) with
nothing written and no input changed; and runs that survive kills, signals, full disks, a second
writer and diverging losses.

Everything is tiny: 16^3 volumes written with nibabel (6 mm voxels, the phantoms' size), three
32^3 phantoms and a checkpoint of the seconds-long ``tiny`` config. Processes are started only
where a real process is the point (SIGTERM, SIGKILL, a concurrent run).
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lckd_kit import MODALITIES, checkpoint as ckpt_io, cli, phantom
from lckd_kit.checkpoint import CHECKPOINT_FORMAT, checksum, load_checkpoint, read_history, seal
from lckd_kit.train import TrainingDiverged, TrainingInterrupted, get_train_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 16)
VOXEL = np.diag([6.0, 6.0, 6.0, 1.0])  # the phantoms' voxel size: nothing is resampled
COMMANDS = {"samples", "train", "elect", "evaluate", "predict", "experiment", "workshop-prep"}


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three 32^3 phantoms and a checkpoint trained on them (tiny: 8 steps)."""
    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(1)
    phantom.generate(root / "data", 3, seed=0, grid=32, progress=False)
    train("tiny", root / "data", out_dir=root / "run", progress=False)
    return {"root": root, "data": root / "data", "ckpt": root / "run" / "final.pt"}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    argv = [str(a) for a in args]
    if argv and argv[0] in COMMANDS and "--threads" not in argv:
        argv += ["--threads", "1"]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line(rc: int, err: str, command: str, *needles: str) -> str:
    """The single error line of ``command``; it contains every needle (case-insensitive)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"lckd-kit {command}: error:")]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def snapshot(*folders: Path) -> dict:
    """Every file under ``folders`` with its bytes' hash: compared before and after a command."""
    out = {}
    for folder in folders:
        if folder.exists():
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    out[str(p)] = hash(p.read_bytes())
    return out


def write_nii(path: Path, data, affine=VOXEL, slope=None, inter=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    return path


def good_case(folder: Path, name: str = "BraTS2021_00000", affine=VOXEL, label=True) -> Path:
    """A valid 16^3 BraTS-2021 case: a brain box of random intensities, a small nested tumour."""
    rng = np.random.default_rng(0)
    case = folder / name
    brain = np.zeros(SHAPE, np.float32)
    brain[2:-2, 2:-2, 2:-2] = 1
    for i, m in enumerate(MODALITIES):
        write_nii(case / f"{name}_{m}.nii.gz", (brain * rng.uniform(100, 400, SHAPE)).astype(np.int16), affine)
    if label:
        write_nii(case / f"{name}_seg.nii.gz", label_map(), affine)
    return case


def label_map(values=(0, 1, 2, 4)) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[6:10, 6:10, 6:10] = 2
    lab[7:9, 7:9, 7:9] = 1
    lab[8, 8, 8] = 4
    return np.vectorize(dict(zip((0, 1, 2, 4), values)).get)(lab).astype(np.uint8)


# ---------------------------------------------------------------------------------- 1. arguments


ARGUMENT_ERRORS = {
    # id: (argv, needles) -- all refused while parsing, before torch is imported
    "unknown config": (["train", "--data", "{data}", "--out", "{out}", "--config", "huge"], ["--config", "huge"]),
    "kd weight nan": (["train", "--data", "{data}", "--out", "{out}", "--kd-weight", "nan"], ["--kd-weight", "finite"]),
    "kd weight negative": (["train", "--data", "{data}", "--out", "{out}", "--kd-weight", "-1"], ["--kd-weight", ">= 0"]),
    "device tpu9": (["train", "--data", "{data}", "--out", "{out}", "--device", "tpu9"], ["--device", "tpu9"]),
    "negative steps": (["train", "--data", "{data}", "--out", "{out}", "--stage1-steps", "-3"], ["--stage1-steps"]),
    "batch size zero": (["train", "--data", "{data}", "--out", "{out}", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "batch size word": (["train", "--data", "{data}", "--out", "{out}", "--batch-size", "two"], ["--batch-size"]),
    "cache mb zero": (["train", "--data", "{data}", "--out", "{out}", "--cache-mb", "0"], ["--cache-mb", "> 0"]),
    "val cases missing": (["train", "--data", "{data}", "--out", "{out}", "--val-cases", "{tmp}/none.txt"],
                          ["--val-cases", "none.txt"]),
    "val cases empty": (["train", "--data", "{data}", "--out", "{out}", "--val-cases", "{tmp}/empty.txt"],
                        ["--val-cases", "names no case"]),
    "unknown convention": (["train", "--data", "{data}", "--out", "{out}", "--convention", "brats2019"],
                           ["--convention", "brats2019"]),
    "election score": (["train", "--data", "{data}", "--out", "{out}", "--election-score", "best"],
                       ["--election-score"]),
    "missing --out": (["train", "--data", "{data}"], ["--out"]),
    "available empty": (["predict", "--case", "{data}", "--checkpoint", "{ckpt}", "--out", "{out}.nii.gz",
                         "--available", ""], ["--available", "no modality"]),
    "available t5": (["predict", "--case", "{data}", "--checkpoint", "{ckpt}", "--out", "{out}.nii.gz",
                      "--available", "t5"], ["--available", "t5"]),
    "samples n zero": (["samples", "--out", "{out}", "--n", "0"], ["--n"]),
    "samples grid tiny": (["samples", "--out", "{out}", "--grid", "8"], ["--grid", ">= 16"]),
    "samples cues inf": (["samples", "--out", "{out}", "--cues", "inf"], ["--cues", "finite"]),
    "samples geometry": (["samples", "--out", "{out}", "--geometry", "moon"], ["--geometry", "moon"]),
    "threads zero": (["samples", "--out", "{out}", "--threads", "0"], ["--threads"]),
    "threads word": (["samples", "--out", "{out}", "--threads", "many"], ["--threads", "many"]),
    "negative seed": (["experiment", "--out", "{out}", "--seeds", "-1"], ["--seeds"]),
    "max cases zero": (["evaluate", "--data", "{data}", "--checkpoint", "{ckpt}", "--out", "{out}", "--max-cases", "0"],
                       ["--max-cases"]),
    "unknown option": (["train", "--data", "{data}", "--out", "{out}", "--bogus"], ["--bogus"]),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_ERRORS))
def test_argument_errors_are_one_line(case, tmp_path, capsys):
    argv, needles = ARGUMENT_ERRORS[case]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    fill = dict(data=tmp_path, out=tmp_path / "out", ckpt=tmp_path / "x.pt", tmp=tmp_path)
    rc, out, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    one_line(rc, err, argv[0], *needles)
    assert not (tmp_path / "out").exists() and out == ""


def test_unknown_command_is_one_line(capsys):
    rc, _, err = run_cli(capsys, "bogus")
    assert rc == 2 and err.startswith("lckd-kit bogus: error: argument command: invalid choice") and err.count("\n") == 1


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    """A mistyped option fails in a fraction of the seconds torch takes to import."""
    code = textwrap.dedent(f"""
        import sys, time
        t = time.perf_counter()
        from lckd_kit import cli
        rc = cli.main(["train", "--data", {str(tmp_path)!r}, "--out", {str(tmp_path / 'o')!r}, "--config", "huge"])
        print(rc, "torch" in sys.modules, "monai" in sys.modules, time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, torch_loaded, monai_loaded, seconds = out.stdout.split()
    assert (rc, torch_loaded, monai_loaded) == ("2", "False", "False"), out.stderr
    assert float(seconds) < 1.0
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "o", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lckd-kit train: error:")
    monkeypatch.setenv("LCKD_KIT_DEBUG", "1")
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2 and "Traceback" in err


# ---------------------------------------------------------------------------------- inputs and devices


def test_input_paths_are_one_line(world, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["train", "--data", tmp_path / "nowhere", "--out", tmp_path / "o"], "train", ["nowhere", "no such folder"]),
        (["train", "--data", afile, "--out", tmp_path / "o"], "train", ["afile.txt", "not a folder"]),
        (["train", "--data", tmp_path / "empty", "--out", tmp_path / "o", "--config", "tiny"], "train",
         ["no brats or msd cases"]),
        (["evaluate", "--data", world["data"], "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "o"],
         "evaluate", ["none.pt", "no such checkpoint"]),
        (["evaluate", "--data", world["data"], "--checkpoint", tmp_path, "--out", tmp_path / "o"], "evaluate",
         ["is a folder", "final.pt"]),
        (["predict", "--case", tmp_path / "nowhere", "--checkpoint", world["ckpt"], "--out", tmp_path / "p.nii.gz"],
         "predict", ["no such case folder"]),
        (["samples", "--out", afile], "samples", ["afile.txt", "is a file"]),
        (["train", "--data", world["data"], "--out", afile / "run"], "train", ["afile.txt", "is a file"]),
    ]
    before = snapshot(tmp_path, world["data"])
    for argv, command, needles in cases:
        rc, _, err = run_cli(capsys, *argv)
        one_line(rc, err, command, *needles)
    assert snapshot(tmp_path, world["data"]) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_unavailable_devices_are_one_line(world, tmp_path, capsys, device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has those GPUs")
    if device == "mps" and hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", tmp_path / "o", "--config", "tiny",
                         "--device", device)
    one_line(rc, err, "train", f"--device {device}", "use --device cpu")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- checkpoints


def _flip_byte_in_a_tensor(src: Path, dst: Path) -> None:
    ckpt = torch.load(src, weights_only=True)
    tensor = max(ckpt["model"].values(), key=lambda t: t.numel())
    raw = bytearray(src.read_bytes())
    at = bytes(raw).find(tensor.contiguous().view(torch.uint8).numpy().tobytes()[:64])
    assert at > 0
    raw[at + 17] ^= 0x10
    dst.write_bytes(bytes(raw))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _bad_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, list[str]]]:
    ckpt = torch.load(good, weights_only=True)
    out = {}

    def put(name, needles, write):
        path = folder / f"{name}.pt"
        write(path)
        out[name] = (path, needles)

    put("empty", ["empty (0 bytes)"], lambda p: p.write_bytes(b""))
    put("truncated", ["truncated or not a checkpoint"], lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]))
    put("text", ["not a"], lambda p: p.write_text("these are not the weights you are looking for\n"))
    _Evil.marker = folder / "pwned"
    put("malicious", ["not a safe lckd_kit checkpoint"], lambda p: torch.save({"format": CHECKPOINT_FORMAT, "x": _Evil()}, p))
    put("state_dict", ["bare state_dict"], lambda p: torch.save(ckpt["model"], p))
    put("a list", ["not an lckd_kit checkpoint", "list"], lambda p: torch.save([1, 2, 3], p))
    put("future format", ["format 'lckd_kit/9'"], lambda p: torch.save({**ckpt, "format": "lckd_kit/9"}, p))
    put("flipped byte", ["checksum mismatch"], lambda p: _flip_byte_in_a_tensor(good, p))
    put("no checksum", ["checksum mismatch"], lambda p: torch.save({k: v for k, v in ckpt.items() if k != "checksum"}, p))
    narrow = {**ckpt, "config": {**ckpt["config"], "model_config": {**ckpt["config"]["model_config"], "stem_width": 8}}}
    put("size mismatch", ["do not fit the model config", "size mismatch"], lambda p: torch.save(seal(narrow), p))
    fewer = {**ckpt, "model": {k: v for i, (k, v) in enumerate(ckpt["model"].items()) if i != 3}}
    put("missing weight", ["do not fit the model config", "1 missing"], lambda p: torch.save(seal(fewer), p))
    put("no model config", ["without its weights or model config"],
        lambda p: torch.save(seal({**ckpt, "config": {}}), p))
    return out


def test_bad_checkpoints_are_one_line_and_run_nothing(world, tmp_path, capsys):
    bad = _bad_checkpoints(world["ckpt"], tmp_path)
    case = world["data"] / "PhantomBraTS_000"
    before = snapshot(world["data"])
    for name, (path, needles) in bad.items():
        for command in ("predict", "evaluate"):
            argv = ["predict", "--case", case, "--out", tmp_path / "pred.nii.gz"] if command == "predict" else \
                ["evaluate", "--data", world["data"], "--out", tmp_path / "eval"]
            rc, _, err = run_cli(capsys, *argv, "--checkpoint", path)
            one_line(rc, err, command, path.name, *needles)
    assert not (tmp_path / "pwned").exists()  # the malicious pickle never ran
    assert not (tmp_path / "pred.nii.gz").exists() and not (tmp_path / "eval").exists()
    assert snapshot(world["data"]) == before


def test_flipped_byte_is_detected_by_load_checkpoint(world, tmp_path):
    _flip_byte_in_a_tensor(world["ckpt"], tmp_path / "flipped.pt")
    raw = torch.load(tmp_path / "flipped.pt", weights_only=True)  # torch itself does not notice
    assert raw["checksum"] != checksum(raw)
    with pytest.raises(ckpt_io.CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "flipped.pt")


def test_format_1_checkpoints_still_load_with_one_warning(world, tmp_path, recwarn):
    old = {k: v for k, v in torch.load(world["ckpt"], weights_only=True).items() if k not in ("checksum", "kit_version")}
    torch.save({**old, "format": "lckd_kit/1"}, tmp_path / "old.pt")
    for _ in range(2):
        assert load_checkpoint(tmp_path / "old.pt")["format"] == "lckd_kit/1"
    assert len([w for w in recwarn if "no checksum" in str(w.message)]) == 1
    ckpt_io.save(load_checkpoint(tmp_path / "old.pt"), tmp_path / "resealed.pt")  # how the warning says to fix it
    new = load_checkpoint(tmp_path / "resealed.pt")
    assert new["format"] == CHECKPOINT_FORMAT and new["checksum"] == checksum(new)
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in old["model"])


def test_shipped_checkpoint_carries_a_valid_checksum():
    from lckd_kit.paths import shipped_checkpoint

    raw = torch.load(shipped_checkpoint(), weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["checksum"] == checksum(raw)


# ---------------------------------------------------------------------------------- data


def _corrupt(kind: str, case: Path) -> tuple[str, list[str]]:
    """Break a good case in one way -> (the file the message must name, other needles)."""
    n = case.name
    f = lambda m: case / f"{n}_{m}.nii.gz"  # noqa: E731
    rng = np.random.default_rng(1)
    if kind == "missing modality":
        f("t1ce").unlink()
        return n, ["t1ce"]
    if kind == "two flair files":
        (case / f"{n}_flair.nii").write_bytes(gzip.decompress(f("flair").read_bytes()))
        return n, ["two flair files"]
    if kind == "shape":
        write_nii(f("t1"), rng.uniform(1, 9, (16, 16, 15)).astype(np.float32))
        return f("t1").name, ["shape"]
    if kind == "affine":
        shifted = VOXEL.copy()
        shifted[:3, 3] = (30.0, 0, 0)
        write_nii(f("t2"), rng.uniform(1, 9, SHAPE).astype(np.float32), shifted)
        return f("t2").name, ["elsewhere in space"]
    if kind in ("nan", "inf"):
        img = rng.uniform(1, 9, SHAPE).astype(np.float32)
        img[5, 5, 5] = np.nan if kind == "nan" else np.inf
        write_nii(f("t1"), img)
        return f("t1").name, ["non-finite"]
    if kind == "truncated gz":
        raw = f("t2").read_bytes()
        f("t2").write_bytes(raw[: len(raw) // 2])
        return f("t2").name, ["cannot be read"]
    if kind == "not gzip":
        f("t2").write_bytes(b"not a nifti at all")
        return f("t2").name, ["cannot be read"]
    if kind == "header claims 1500^3 (gz)":
        img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), VOXEL)
        hdr = img.header.copy()
        hdr.set_data_shape((1500, 1500, 1500))
        f("flair").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 2000))
        return f("flair").name, ["cannot be read", "1500x1500x1500"]
    if kind == "header claims 1500^3 (nii)":
        f("flair").unlink()
        img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), VOXEL)
        hdr = img.header.copy()
        hdr.set_data_shape((1500, 1500, 1500))
        (case / f"{n}_flair.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 2000)
        return f"{n}_flair.nii", ["cannot be read", "1500x1500x1500"]
    if kind == "flair x1e34":
        img = nib.load(str(f("flair"))).get_fdata().astype(np.float32) * np.float32(1e34)
        write_nii(f("flair"), img)
        return f("flair").name, ["intensities reach", "scaling"]
    if kind == "label value 3":
        write_nii(f("seg"), label_map((0, 1, 2, 3)))
        return f("seg").name, ["label values [3]", "brats2023"]
    if kind == "label 2.5":
        lab = label_map().astype(np.float32)
        lab[8, 8, 8] = 2.5
        write_nii(f("seg"), lab)
        return f("seg").name, ["whole numbers", "2.5"]
    if kind == "label slope 0.5":  # ET 4 is read as 2 (edema), NCR 1 as 0.5
        write_nii(f("seg"), label_map(), slope=0.5)
        return f("seg").name, ["whole numbers", "slope 0.5"]
    if kind == "label slope 2":  # every value integral, 8 is no label
        write_nii(f("seg"), label_map(), slope=2.0)
        return f("seg").name, ["label values [8]", "slope 2"]
    if kind == "label shape":
        write_nii(f("seg"), np.zeros((16, 16, 14), np.uint8))
        return f("seg").name, ["shape"]
    if kind == "label nan":
        lab = label_map().astype(np.float32)
        lab[0, 0, 0] = np.nan
        write_nii(f("seg"), lab)
        return f("seg").name, ["non-finite"]
    raise AssertionError(kind)


DATA_ERRORS = ["missing modality", "two flair files", "shape", "affine", "nan", "inf", "truncated gz", "not gzip",
               "header claims 1500^3 (gz)", "header claims 1500^3 (nii)", "flair x1e34", "label value 3", "label 2.5",
               "label slope 0.5", "label slope 2", "label shape", "label nan"]


@pytest.mark.parametrize("kind", DATA_ERRORS)
def test_bad_data_is_one_line_naming_the_file(world, tmp_path, capsys, kind):
    case = good_case(tmp_path / "data")
    named, needles = _corrupt(kind, case)
    before = snapshot(tmp_path / "data")
    start = time.perf_counter()
    rc, _, err = run_cli(capsys, "evaluate", "--data", tmp_path / "data", "--checkpoint", world["ckpt"],
                         "--out", tmp_path / "eval")
    one_line(rc, err, "evaluate", named, *needles)
    assert snapshot(tmp_path / "data") == before and not (tmp_path / "eval").exists()
    if "1500" in kind:  # refused from the header, before 6.75 GB would be allocated
        assert time.perf_counter() - start < 20


def test_consistently_flipped_files_are_accepted_and_disagreeing_ones_refused(tmp_path):
    from lckd_kit.data import find_cases, load_case

    good_case(tmp_path / "a")
    reference = load_case(find_cases(tmp_path / "a")[0])
    case = good_case(tmp_path / "b")
    # the T2 and the label stored with the first axis flipped: the same voxels in space
    flip = VOXEL.copy()
    flip[0, 0], flip[0, 3] = -6.0, 6.0 * (SHAPE[0] - 1)
    for m in ("t2", "seg"):
        path = case / f"{case.name}_{m}.nii.gz"
        img = nib.load(str(path))
        write_nii(path, np.asanyarray(img.dataobj)[::-1], flip)
    loaded = load_case(find_cases(tmp_path / "b")[0])
    np.testing.assert_array_equal(loaded["image"], reference["image"])
    np.testing.assert_array_equal(loaded["label"], reference["label"])
    # flipped without moving the origin: the voxels lie elsewhere, refused
    path = case / f"{case.name}_t2.nii.gz"
    write_nii(path, np.asanyarray(nib.load(str(path)).dataobj), np.diag([-6.0, 6.0, 6.0, 1.0]))
    with pytest.raises(ValueError, match="elsewhere in space"):
        load_case(find_cases(tmp_path / "b")[0])


def test_normalisation_refuses_non_finite_output():
    from lckd_kit.transforms import normalize_image

    image = np.zeros((4, 8, 8, 8), np.float32)
    image[:, 2:6, 2:6, 2:6] = np.random.default_rng(0).uniform(100, 1000, (4, 4, 4, 4))
    image[0] *= np.float32(1e35)
    with pytest.raises(ValueError, match="normalising flair gave non-finite values"):
        normalize_image(image)


# ---------------------------------------------------------------------------------- outputs


def test_outputs_never_overwrite_inputs(world, tmp_path, capsys):
    data = tmp_path / "data"
    case = good_case(data)
    good_case(data, "BraTS2021_00001")
    seg = case / f"{case.name}_seg.nii.gz"
    ck = ["--checkpoint", world["ckpt"]]
    refused = [
        (["predict", "--case", case, *ck, "--out", seg], "predict", [seg.name, "inside the case folder"]),
        (["predict", "--case", case, *ck, "--out", case / "pred.nii.gz"], "predict", ["pred.nii.gz", "--force"]),
        (["predict", "--case", case, *ck, "--out", tmp_path / "pred.txt"], "predict", ["must end in .nii or .nii.gz"]),
        (["predict", "--case", data, *ck, "--out", tmp_path / "one.nii.gz"], "predict",
         ["holds 2 cases", "--out must be a folder"]),
        (["predict", "--case", case, *ck, "--out", seg / "x.nii.gz"], "predict", ["is a file"]),
        (["evaluate", "--data", data, *ck, "--out", data / "eval"], "evaluate", ["inside the data", "--force"]),
        (["evaluate", "--data", data, *ck, "--out", seg], "evaluate", [seg.name, "is a file"]),
        (["evaluate", "--data", data, *ck, "--out", case / "eval"], "evaluate", ["inside the data"]),
        (["evaluate", "--data", data, *ck, "--out", world["ckpt"], "--force"], "evaluate", ["is a file"]),
    ]
    before = snapshot(data, world["root"] / "run")
    for argv, command, needles in refused:
        rc, _, err = run_cli(capsys, *argv)
        one_line(rc, err, command, *needles)
    assert snapshot(data, world["root"] / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # --force writes inside the case folder (a phantom copy: 16^3 is below the model's input size)
    ph = tmp_path / "ph"
    ph.mkdir()
    for f in (world["data"] / "PhantomBraTS_000").iterdir():
        (ph / f.name).write_bytes(f.read_bytes())
    rc, out, err = run_cli(capsys, "predict", "--case", ph, *ck, "--out", ph / "pred.nii.gz", "--force")
    assert rc == 0 and (ph / "pred.nii.gz").is_file() and f"-> {ph / 'pred.nii.gz'}" in out, err


def test_experiment_refuses_an_output_inside_the_kits_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LCKD_KIT_CACHE", str(tmp_path / "cache"))
    rc, _, err = run_cli(capsys, "experiment", "--out", tmp_path / "cache" / "report", "--quick")
    one_line(rc, err, "experiment", "inside the kit's data", "--force")
    assert not (tmp_path / "cache").exists()


def test_predict_a_folder_of_cases_through_links_and_a_link_cycle(world, tmp_path, capsys):
    """A folder whose cases are symbolic links (one of them twice, one loop back to the top): every
    case once, one file each in the --out folder, named after the case and the subset."""
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "linked").symlink_to(world["data"] / "PhantomBraTS_001", target_is_directory=True)
    (cases / "again").symlink_to(world["data"] / "PhantomBraTS_001", target_is_directory=True)
    (cases / "loop").symlink_to(cases, target_is_directory=True)
    (cases / "own").mkdir()
    for f in (world["data"] / "PhantomBraTS_002").iterdir():
        (cases / "own" / f.name).write_bytes(f.read_bytes())
    rc, out, err = run_cli(capsys, "predict", "--case", cases, "--checkpoint", world["ckpt"], "--out", tmp_path / "preds",
                           "--available", "flair+t1ce")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == [
        "PhantomBraTS_001_flair+t1ce.nii.gz", "PhantomBraTS_002_flair+t1ce.nii.gz"]
    assert out.count("-> ") == 2
    label = nib.load(str(tmp_path / "preds" / "PhantomBraTS_001_flair+t1ce.nii.gz"))
    assert label.shape == (32, 32, 32) and set(np.unique(np.asanyarray(label.dataobj))) <= {0, 1, 2, 4}


def test_evaluate_leaves_out_the_cases_the_checkpoint_trained_on(world, tmp_path, capsys):
    split = load_checkpoint(world["ckpt"])["split"]
    rc, out, err = run_cli(capsys, "evaluate", "--data", world["data"], "--checkpoint", world["ckpt"],
                           "--out", tmp_path / "eval")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("scoring"))
    assert line.startswith(f"scoring {len(split['val'])} case(s)") and f"left out {len(split['train'])}" in line
    scored = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sorted({r["case"] for r in scored["rows"]}) == sorted(split["val"])
    rc, out, err = run_cli(capsys, "evaluate", "--data", world["data"], "--checkpoint", world["ckpt"],
                           "--out", tmp_path / "all", "--include-training")
    assert rc == 0 and "scoring 3 case(s)" in out and "overstate" in err


# ---------------------------------------------------------------------------------- runs


ARGS = ["--config", "tiny", "--checkpoint-every", "2"]


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS)
    one_line(rc, err, "train", "another run is writing", f"PID {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "since": "then"}))
    (out / ".last.pt.tmp-999999").write_bytes(b"half a checkpoint")  # left by a killed run
    (out / ".history.jsonl.tmp-999999").write_text("{")
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS)
    assert rc == 0 and "took over the lock" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "final.pt", "history.jsonl", "last.pt"]


def test_resume_falls_back_to_the_previous_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "run"
    train("tiny", world["data"], out_dir=out, progress=False, max_steps=5)  # last.pt at 5, last.prev.pt at 4
    assert load_checkpoint(out / "last.prev.pt")["step"] == 4
    raw = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(raw[: len(raw) // 3])  # damaged after it was written
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS, "--resume")
    assert rc == 0 and "resumed from" in err and "last.prev.pt (step 4)" in err
    full = train("tiny", world["data"], out_dir=tmp_path / "full", progress=False)
    assert read_history(out) == full.history
    a, b = load_checkpoint(out / "final.pt")["model"], load_checkpoint(tmp_path / "full" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # nothing to fall back to: a clear refusal, the damaged file left for inspection
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "last.pt").write_bytes(b"")
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", tmp_path / "lone", *ARGS, "--resume")
    one_line(rc, err, "train", "cannot resume", "empty", "no last.prev.pt")


def test_resuming_a_finished_run_writes_a_missing_final_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "run"
    train("tiny", world["data"], out_dir=out, progress=False)
    (out / "final.pt").unlink()  # killed between final.pt and last.pt by an older kit, or deleted
    rc, stdout, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS, "--resume")
    assert rc == 0 and "final.pt was missing: written" in err
    assert load_checkpoint(out / "final.pt")["step"] == 8
    rc, stdout, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS, "--resume")
    assert rc == 0 and "already finished its 8 steps" in stdout


def test_a_non_finite_loss_stops_with_the_last_finite_state(world, tmp_path, capsys, monkeypatch):
    import lckd_kit.train as train_module

    seg = train_module.segmentation_loss
    calls = []

    def poisoned(logits, target):
        calls.append(1)
        loss, dice, bce = seg(logits, target)
        return (loss * float("nan"), dice, bce) if len(calls) == 5 else (loss, dice, bce)

    monkeypatch.setattr(train_module, "segmentation_loss", poisoned)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS)
    one_line(rc, err, "train", "non-finite at step 5", "last finite state", "step 4", "--resume")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert max(r["step"] for r in read_history(out)) == 4 and not (out / "final.pt").exists()


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_leaves_the_run_folder_consistent(world, tmp_path, capsys, monkeypatch, fault):
    out = tmp_path / "run"
    save = torch.save

    def failing_save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step", 0) >= 4:
            raise OSError(fault, os.strerror(fault))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS)
    line = one_line(rc, err, "train", "last.pt", "MB needed", "previous files are left")
    assert ("no space left" in line) if fault == errno.ENOSPC else ("read-only" in line)
    monkeypatch.setattr(torch, "save", save)
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.jsonl", "last.pt"]  # no temporaries
    assert [r["step"] for r in read_history(out) if r["kind"] == "step"] == [1, 2, 3, 4]
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", out, *ARGS, "--resume")
    assert rc == 0 and load_checkpoint(out / "final.pt")["step"] == 8


def test_a_read_only_run_folder_is_one_line(world, tmp_path, capsys, monkeypatch):
    mkdir = Path.mkdir

    def read_only(self, *a, **kw):
        if self.name == "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    rc, _, err = run_cli(capsys, "train", "--data", world["data"], "--out", tmp_path / "run", *ARGS)
    one_line(rc, err, "train", "read-only file system", "writable disk")


def test_interrupts_stop_at_a_step_boundary_and_a_second_at_once(world, tmp_path):
    """SIGINT / SIGTERM in the main thread (what a terminal's Ctrl-C or a scheduler sends)."""
    def send(n, at):
        def callback(step, record):
            if record["kind"] == "step" and step == at:
                for _ in range(n):
                    os.kill(os.getpid(), signal.SIGINT)
        return callback

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as first:
        train("tiny", world["data"], out_dir=tmp_path / "one", progress=False, callback=send(1, 3))
    assert (first.value.step, first.value.signum) == (3, signal.SIGINT) and isinstance(first.value, KeyboardInterrupt)
    assert load_checkpoint(tmp_path / "one" / "last.pt")["step"] == 3 and not (tmp_path / "one" / ".lock").exists()
    with pytest.raises(TrainingInterrupted, match="at once") as second:
        train("tiny", world["data"], out_dir=tmp_path / "two", progress=False, callback=send(2, 3))
    assert second.value.step == 2 and load_checkpoint(tmp_path / "two" / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


# ---------------------------------------------------------------------------------- processes


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--config", "tiny", "--threads", "1", *extra]


def test_sigterm_saves_a_resumable_checkpoint_and_a_second_run_is_refused(world, tmp_path, capsys):
    steps = ["--stage1-steps", "60", "--stage2-steps", "0", "--elect-every", "1000", "--checkpoint-every", "1000"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lckd_kit", *_train_argv(world["data"], out, *steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len([r for r in read_history(out) if r["kind"] == "step"]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        # the folder is in use: a second run into it is refused, and changes nothing
        rc, _, err = run_cli(capsys, *_train_argv(world["data"], out, *steps))
        one_line(rc, err, "train", "another run is writing", f"PID {proc.pid}")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    last = [ln for ln in stderr.splitlines() if ln.startswith("lckd-kit train:")][-1]
    saved = load_checkpoint(out / "last.pt")["step"]
    assert last.startswith("lckd-kit train: stopped by SIGTERM") and f"holds step {saved}" in last and "--resume" in last
    assert 2 <= saved < 60 and max(r["step"] for r in read_history(out)) == saved and not (out / ".lock").exists()
    rc, _, err = run_cli(capsys, *_train_argv(world["data"], out, *steps, "--resume"))
    assert rc == 0, err
    full = train(get_train_config("tiny", stage1_steps=60, stage2_steps=0, elect_every=1000, checkpoint_every=1000),
                 world["data"], out_dir=tmp_path / "full", progress=False)
    resumed = load_checkpoint(out / "final.pt")["model"]
    assert all(torch.equal(resumed[k], v) for k, v in full.model.state_dict().items())
    assert read_history(out) == full.history


KILLER = textwrap.dedent("""
    # Kills `lckd-kit train --checkpoint-every 1` with SIGKILL at random moments, resuming the same
    # run folder each time until a resume gets to finish it, then starts the next run folder.
    # Forks of one warm process, so no attempt pays torch's import again.
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from lckd_kit import cli, train, runtime  # imported once, before the forks
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # so is what optimisers import lazily
    data, root, tries, seed, span = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    # kill moments are drawn over `span` times an uninterrupted run's duration, measured here first,
    # so that they cover the run on a fast machine and a slow one alike
    args = ["train", "--data", data, "--config", "tiny", "--checkpoint-every", "1", "--threads", "1"]

    def start(out, resume):
        pid = os.fork()
        if pid == 0:
            log = os.open(os.path.join(root, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os._exit(cli.main(args + ["--out", out] + (["--resume"] if resume else []), tune_process=False))
        return pid

    def status(pid):
        _, st = os.waitpid(pid, 0)
        return "killed" if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

    def progress(run):  # the last step the history reached (json only: no torch between forks)
        steps = []
        try:
            for line in open(os.path.join(run, "history.jsonl")):
                try:
                    steps.append(json.loads(line)["step"])
                except ValueError:
                    pass
        except OSError:
            pass
        return max(steps, default=0)

    t0 = time.perf_counter()
    reference = status(start(os.path.join(root, "reference"), False))
    span *= time.perf_counter() - t0
    rng, outcomes, reached, runs = random.Random(seed), [], [], [os.path.join(root, "killed0")]
    for _ in range(tries):
        pid = start(runs[-1], True)
        time.sleep(rng.uniform(0.0, span))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        outcomes.append(status(pid))
        reached.append(progress(runs[-1]))
        if outcomes[-1] != "killed":  # this run is finished: kill the next one
            runs.append(os.path.join(root, f"killed{len(runs)}"))
    final = status(start(runs[-1], True))
    print(json.dumps({"outcomes": outcomes, "reached": reached, "final": final, "reference": reference,
                      "runs": runs, "span_s": span}))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a warm process")
def test_sigkill_at_random_moments_never_loses_the_run(world, tmp_path):
    # kills within one uninterrupted run's duration after a (warm) start land anywhere in a tiny run,
    # from its start to its last checkpoint, and each run takes several resumes to finish (asserted
    # below from the histories)
    out = subprocess.run([sys.executable, "-c", KILLER, str(world["data"]), str(tmp_path), "20", "7", "1.0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log = (tmp_path / "log.txt").read_text()
    # every attempt was either killed or ended well (a finished run resumes to "nothing to train")
    assert set(result["outcomes"]) <= {"killed", 0}, log[-3000:]
    assert result["outcomes"].count("killed") >= 10 and result["final"] == 0 and result["reference"] == 0
    assert len(set(result["reached"])) >= 4, result  # the kills landed all along the runs, not only at their start
    assert "error:" not in log and "Traceback" not in log
    reference = load_checkpoint(tmp_path / "reference" / "final.pt")
    for run in map(Path, result["runs"]):  # every run, however often killed, ends as the uninterrupted one
        final = load_checkpoint(run / "final.pt")
        assert final["step"] == 8 and all(torch.equal(final["model"][k], v) for k, v in reference["model"].items())
        assert read_history(run) == read_history(tmp_path / "reference")
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "final.pt", "history.jsonl", "last.pt"]
