"""Each layer converter against OpenCV 4.x dnn on small random nets written in Caffe's binary format.

A few seeds per family run in `make test`; more under the slow marker.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.registry_nets import OPENCV_CASES, assert_close, opencv_blobs, registry_blobs

cv2 = pytest.importorskip("cv2")
if not cv2.__version__.startswith("4."):
    pytest.skip("OpenCV 4.x (with its Caffe importer) is needed", allow_module_level=True)

FAST_SEEDS = (0, 1, 2)
SLOW_SEEDS = tuple(range(3, 25))


def _compare(tmp_path, family: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    spec = OPENCV_CASES[family](rng)
    prototxt, caffemodel = spec.write(tmp_path)
    feeds = spec.feeds(rng)
    net, ours = registry_blobs(prototxt, caffemodel, feeds)
    produced = [top for info in net.graph.layers for top in info.tops]
    names = list(dict.fromkeys(produced))
    theirs = opencv_blobs(prototxt, caffemodel, feeds, names)
    for name in names:
        ref = theirs[name]
        mine = ours[name]
        if ref.shape != mine.shape and ref.size == mine.size:  # OpenCV drops trailing 1-dims of 2-D blobs
            ref = ref.reshape(mine.shape)
        assert_close(mine, ref, f"{family} seed {seed} blob '{name}'")


@pytest.mark.parametrize("seed", FAST_SEEDS)
@pytest.mark.parametrize("family", sorted(OPENCV_CASES))
def test_layer_matches_opencv(tmp_path, family: str, seed: int) -> None:
    _compare(tmp_path, family, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
@pytest.mark.parametrize("family", sorted(OPENCV_CASES))
def test_layer_matches_opencv_many_seeds(tmp_path, family: str, seed: int) -> None:
    _compare(tmp_path, family, seed)
