"""The trainer end to end on the tiny configuration: snapshots, log, parity, bad input, loss falls, exact resume, torchrun."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from converter.checkpoint import read_checkpoint, sha256_file, update_manifest
from converter.cli import main as converter_main
from converter.loading import load_model
from converter.synthetic.weights import write_synthetic_deeplab
from models.alignment import VOC_MEAN_BGR
from models.deeplab import ResNetConfig
from segmentation.demo_data import DemoSpec, write_demo_dataset
from segmentation.solver import poly_rate
from segmentation.train import main
from segmentation.train_log import LOG_COLUMNS
from verify.verdict import describe_parity

REPO = Path(__file__).resolve().parents[1]
# One thread per process: on a shared 2-core machine OpenMP's spinning threads slow tiny convs 10-100x.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
PASS_RECORD = {"verdict": "pass", "reference_producer": "opencv 4.12.0", "date": "2026-12-02", "scope": "full"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny init (synthetic, no near-eps BatchNorm channels) and a small demo dataset."""
    root = tmp_path_factory.mktemp("train")
    files = write_synthetic_deeplab(root / "caffe", "init", ResNetConfig.tiny(), seed=0, near_eps=False)
    args = ["convert", "--caffemodel", str(files.caffemodel), "--out", str(root / "init"), "--surgery", "auto", "--classes", "21"]
    assert converter_main(args) == 0
    write_demo_dataset(root / "data", DemoSpec(train=8, val=2, min_size=40, max_size=72))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(workspace: Path, out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return [
        "--checkpoint", str(checkpoint or workspace / "init"),
        "--data", str(workspace / "data"),
        "--list", str(workspace / "data" / "list" / "train.txt"),
        "--out", str(out),
        "--crop-size", "33",
        "--workers", "0",
        "--device", "cpu",
        "--effective-batch", "2",
        *extra,
    ]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_training_writes_snapshots_log_curve_and_loadable_checkpoints(workspace: Path, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "parent"
    shutil.copytree(workspace / "init", parent)
    update_manifest(parent, "parity", PASS_RECORD)
    out = tmp_path / "run"
    assert main(_args(workspace, out, "--max-iter", "6", "--stop-after", "3", "--snapshot", "2", checkpoint=parent)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("checkpoint verified: PASS")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("iter_")) == ["iter_2", "iter_3"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    with open(out / "log.csv", newline="") as stream:
        assert tuple(next(csv.reader(stream))) == LOG_COLUMNS
    rows = _rows(out)
    assert [int(r["update"]) for r in rows] == [0, 1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([poly_rate(2.5e-4, k, 6, 0.9) for k in range(3)])
    for row in rows:
        terms = sum(float(row[name]) for name in ("loss", "loss_res1", "loss_res075", "loss_res05"))
        assert float(row["total_loss"]) == pytest.approx(terms)
    model, manifest = load_model(out / "iter_3")
    assert model.num_classes == 21
    assert manifest["preprocessing"] == {"mean_bgr": list(VOC_MEAN_BGR)}
    assert manifest["parent"]["weights"]["sha256"] == sha256_file(parent / "model.safetensors")
    assert manifest["training"]["update"] == 3 and manifest["training"]["config"]["solver"]["max_iter"] == 6
    line = describe_parity(manifest)
    assert "PASS" in line and "parent checkpoint" in line
    start = _weights(parent)
    changed = [key for key, value in _weights(out / "iter_3").items() if not torch.equal(value, start[key])]
    assert changed and all(".bn" not in key and "downsample.1" not in key for key in changed)  # BN frozen


def test_failed_parity_is_refused_unless_allowed(workspace: Path, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "parent"
    shutil.copytree(workspace / "init", parent)
    update_manifest(parent, "parity", {**PASS_RECORD, "verdict": "fail", "first_diverging_blob": {"name": "res2a"}})
    assert main(_args(workspace, tmp_path / "a", "--stop-after", "1", checkpoint=parent)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "FAILED" in error[0] and "--allow-unverified" in error[0]
    assert main(_args(workspace, tmp_path / "b", "--stop-after", "1", "--allow-unverified", checkpoint=parent)) == 0


def _write_label(path: Path, label: np.ndarray) -> None:
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def _bad_dataset(kind: str, root: Path, workspace: Path) -> list[str]:
    """Extra arguments (and files under root) that make one kind of bad input."""
    data = root / "data"
    shutil.copytree(workspace / "data", data)
    list_path = data / "list" / "train_ids.txt"
    if kind == "missing files":
        list_path.write_text(list_path.read_text() + "gone_1\ngone_2\n")
    elif kind == "label values":
        _write_label(data / "SegmentationClassAug" / "train_00003.png", np.full((50, 50), 30))
        shutil.copy(data / "JPEGImages" / "train_00000.jpg", data / "JPEGImages" / "train_00003.jpg")
    elif kind == "size mismatch":
        _write_label(data / "SegmentationClassAug" / "train_00002.png", np.zeros((7, 9)))
    elif kind == "empty list":
        list_path.write_text("\n")
    elif kind == "class count":
        return ["--data", str(data), "--list", str(list_path), "--num-classes", "5"]
    elif kind == "crop":
        return ["--data", str(data), "--list", str(list_path), "--crop-size", "64"]
    elif kind == "batch split":
        return ["--data", str(data), "--list", str(list_path), "--effective-batch", "10", "--batch-size", "3"]
    elif kind == "unused define":
        solver = root / "solver.prototxt"
        solver.write_text("base_lr: 0.001\n")
        return ["--data", str(data), "--list", str(list_path), "--solver", str(solver), "--define", "NUM_LABLES=21"]
    elif kind == "solver field":
        solver = root / "solver.prototxt"
        solver.write_text('base_lr: 0.001\nlr_policy: "step"\nstepsize: 100\n')
        return ["--data", str(data), "--list", str(list_path), "--solver", str(solver)]
    return ["--data", str(data), "--list", str(list_path)]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing files", "4 listed files are missing"),
        ("label values", "label values outside"),
        ("size mismatch", "is 9x7"),
        ("empty list", "empty"),
        ("class count", "21 classes but the dataset has 5"),
        ("crop", "32k\\+1"),
        ("solver field", "lr_policy"),
        ("unused define", "NUM_LABLES: no such"),
        ("batch split", "10 is not a multiple of batch size 3 x world size 1 .*1, 2, 5, 10"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_training(workspace: Path, tmp_path: Path, capsys, kind: str, message: str) -> None:
    out = tmp_path / "out"
    extra = _bad_dataset(kind, tmp_path, workspace)
    assert main(_args(workspace, out, "--stop-after", "1", *extra)) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists()  # nothing written


def test_loss_falls_on_the_demo_data(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _args(workspace, out, "--max-iter", "30", "--effective-batch", "4")
    args[args.index("--crop-size") + 1] = "65"
    assert main(args) == 0
    losses = [float(row["total_loss"]) for row in _rows(out)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def _train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "segmentation", "train", *args]


def test_resume_after_sigkill_reaches_bitwise_identical_weights(workspace: Path, tmp_path: Path) -> None:
    common = ["--max-iter", "40", "--snapshot", "2"]
    whole = tmp_path / "whole"
    assert main(_args(workspace, whole, *common, "--stop-after", "12")) == 0  # one thread, as the subprocess
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(*_args(workspace, killed, *common)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "iter_2").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete = sorted(int(p.name[5:]) for p in killed.iterdir() if p.name.startswith("iter_"))
    assert complete and complete[0] == 2
    for update in complete:  # every snapshot left behind is complete and verifiable
        read_checkpoint(killed / f"iter_{update}")
    start = max(n for n in complete if n < 12)
    resume = ["--resume", str(killed / f"iter_{start}"), "--out", str(killed), "--stop-after", "12", "--workers", "0"]
    assert main(resume) == 0
    expected, got = _weights(whole / "iter_12"), _weights(killed / "iter_12")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert [r["total_loss"] for r in _rows(killed)] == [r["total_loss"] for r in _rows(whole)]
    assert main(["--resume", str(killed / "iter_12"), "--stop-after", "8", "--workers", "0"]) == 2  # nothing to train


def test_two_torchrun_processes_match_one_process_of_the_same_effective_batch(workspace: Path, tmp_path: Path) -> None:
    """Tolerance: gloo averages the two ranks' gradients where one process sums its passes, so only
    float32 summation order differs: weights agree to 1e-5 relative to their scale after 3 updates."""
    common = ["--effective-batch", "4", "--batch-size", "1", "--stop-after", "3", "--max-iter", "10", "--base-lr", "0.001"]
    single = tmp_path / "single"
    assert main(_args(workspace, single, *common)) == 0
    pair = tmp_path / "pair"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "segmentation", "train", *_args(workspace, pair, *common),
    ]  # fmt: skip
    subprocess.run(command, env=ENV, check=True, capture_output=True, timeout=300)
    expected, got = _weights(single / "iter_3"), _weights(pair / "iter_3")
    start = _weights(workspace / "init")
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    assert moved > 1e-4  # the comparison is about trained weights
    for key in expected:
        scale = expected[key].abs().max().item() + 1e-12
        assert (expected[key] - got[key]).abs().max().item() <= 1e-5 * scale, key
    assert read_checkpoint(pair / "iter_3")[1]["training"]["config"]["world_size"] == 2


def test_a_batch_of_two_matches_two_single_image_passes(workspace: Path, tmp_path: Path) -> None:
    """Same slots, same augmentation: only float32 summation order differs (tolerance 1e-5 of the weight scale)."""
    common = ["--effective-batch", "2", "--stop-after", "2", "--max-iter", "10", "--base-lr", "0.001"]
    assert main(_args(workspace, tmp_path / "batch", *common, "--batch-size", "2")) == 0
    assert main(_args(workspace, tmp_path / "passes", *common, "--batch-size", "1")) == 0
    batch, passes = _weights(tmp_path / "batch" / "iter_2"), _weights(tmp_path / "passes" / "iter_2")
    for key in batch:
        scale = passes[key].abs().max().item() + 1e-12
        assert (batch[key] - passes[key]).abs().max().item() <= 1e-5 * scale, key
    assert [r["lr"] for r in _rows(tmp_path / "batch")] == [r["lr"] for r in _rows(tmp_path / "passes")]
