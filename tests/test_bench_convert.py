"""The conversion benchmark runs end to end on the tiny config, and its memory helper measures what it says.

No timing is asserted: the figures belong in docs/benchmarks.md, not in a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from benchmarks import bench_convert
from benchmarks.memory import measure
from models.deeplab import ResNetConfig

MIB = 2**20

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS measurement needs Linux /proc/self/clear_refs"
)


def allocating_method(held_mib: int, transient_mib: int, prepare_spike_mib: int) -> Callable[[], dict]:
    """Child-side method for the memory test: keeps `held_mib`, spikes in preparation, allocates when timed."""
    spike = np.ones(prepare_spike_mib * MIB, np.uint8)
    del spike
    held = np.ones(held_mib * MIB, np.uint8)

    def timed() -> dict:
        transient = np.ones(transient_mib * MIB, np.uint8)
        return {"checksum": int(transient[::4096].sum()) + int(held[0])}

    return timed


def test_measure_counts_held_and_timed_memory_but_not_preparation_spikes() -> None:
    m = measure("tests.test_bench_convert:allocating_method", {"held_mib": 64, "transient_mib": 128, "prepare_spike_mib": 400})
    assert m.result["checksum"] == 128 * MIB // 4096 + 1
    assert 56 * MIB <= m.held_before <= 80 * MIB
    assert 176 * MIB <= m.peak_rss <= 260 * MIB  # 64 held + 128 timed (less a little that may page out), not the 400 MiB spike
    assert m.wall_s > 0


def test_widened_config_hits_the_requested_total_size() -> None:
    base = ResNetConfig.tiny()
    target = 40 * MIB
    config = bench_convert.widened_config(base, target)
    total = bench_convert.TOWERS * bench_convert.tower_bytes(config)
    assert config.blocks == base.blocks
    assert abs(total - target) / target < 0.05


def test_benchmark_runs_end_to_end_on_the_tiny_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_convert.main([
        "--config", "tiny", "--workdir", str(tmp_path), "--repeat", "1",
        "--hdf5-gib", "0.005", "--min-free-gib", "0.1",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("(a) floor", "np.array(blob.data)", "list(blob.data)", "(c) this project",
                  "(i) read every blob", "(ii) convert to a checkpoint"):
        assert label in printed
    assert "all methods wrote the same model.safetensors: yes" in printed
    assert printed.count("target (c)") == 3
    assert not (tmp_path / "hdf5").exists()  # the big files are removed unless --keep
    assert not (tmp_path / "out").exists()


def test_benchmark_reuses_the_caffemodel_when_its_sha256_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, digest = bench_convert.ensure_caffemodel(tmp_path, "tiny", 0)
    capsys.readouterr()
    again, digest_again = bench_convert.ensure_caffemodel(tmp_path, "tiny", 0)
    assert (again, digest_again) == (first, digest)
    assert "reusing" in capsys.readouterr().out
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))  # corrupted: regenerated, not reused
    _, regenerated = bench_convert.ensure_caffemodel(tmp_path, "tiny", 0)
    assert regenerated == digest
    assert "generating" in capsys.readouterr().out


def test_benchmark_refuses_to_start_without_enough_free_disk(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="GiB free"):
        bench_convert.main(["--config", "tiny", "--workdir", str(tmp_path), "--min-free-gib", "1e9"])
