"""Evaluation under torchrun: two CPU processes (gloo), unpadded shards, all-reduced confusion matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eval_case import PAD, write_tiny_checkpoint
from segmentation.demo_data import DemoSpec, write_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_equals_single_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo_dataset(data, DemoSpec(train=1, val=5, min_size=40, max_size=70, seed=5))  # 5: shards of 3 and 2
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    common = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--list", str(data / "list/val.txt"),
              "--workers", "0", "--quiet", "--pad", str(PAD), "--device", "cpu", "--threads", "1"]
    single = _run([sys.executable, "-m", "segmentation", *common, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    double = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "segmentation", *common, "--out", str(tmp_path / "two")])
    assert double.returncode == 0, double.stderr
    assert "on 2 processes" in double.stdout
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert sum(map(sum, one["confusion_matrix"])) > 0
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["miou"] == one["miou"] and two["per_class"] == one["per_class"]
