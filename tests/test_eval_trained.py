"""Evaluation sees learning: the tiny net trained briefly on the synthetic data scores far above its untrained init."""

from __future__ import annotations

import json
from pathlib import Path

import torch


from eval_case import write_tiny_checkpoint
from segmentation.demo_data import DemoSpec, write_demo_dataset
from segmentation.evaluate import main as eval_main
from segmentation.train import main as train_main

UPDATES = 40


def _miou(checkpoint: Path, data: Path, out: Path) -> float:
    assert eval_main(["--checkpoint", str(checkpoint), "--data", str(data), "--list", str(data / "list/val.txt"),
                      "--out", str(out), "--workers", "0", "--quiet", "--pad", "0", "--device", "cpu"]) == 0
    return json.loads((out / "report.json").read_text())["miou"]


def test_trained_tiny_model_scores_far_above_its_untrained_init(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: OpenMP's spinning threads slow tiny convs 5x here
    try:
        _train_and_compare(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_and_compare(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo_dataset(data, DemoSpec(train=16, val=4, min_size=48, max_size=80))
    init = write_tiny_checkpoint(tmp_path / "init")
    assert train_main(["--checkpoint", str(init), "--data", str(data), "--list", str(data / "list/train.txt"),
                       "--out", str(tmp_path / "run"), "--crop-size", "65", "--workers", "0", "--device", "cpu",
                       "--effective-batch", "2", "--max-iter", str(UPDATES), "--base-lr", "0.005"]) == 0
    untrained = _miou(init, data, tmp_path / "eval_init")
    trained = _miou(tmp_path / "run" / f"iter_{UPDATES}", data, tmp_path / "eval_trained")
    # Measured here: 0.00 untrained, 0.51 after 40 updates.
    assert untrained < 0.05
    assert trained > 0.35 and trained > untrained + 0.3, (untrained, trained)
