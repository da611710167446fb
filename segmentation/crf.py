"""DenseCRF post-processing (Krähenbühl & Koltun) as in DeepLab's CRF protocol, via the `pydensecrf2` package.

Defaults are the DeepLab-v2 ResNet-101 project page's values (10 mean-field iterations, bilateral weight 4,
xy std 67, rgb std 3; position weight 3, xy std 1). The DenseCRF block commented out in the release's test
prototxts holds other numbers: it is only a template, not the published setting. The CRF runs on the softmax
of the zoomed scores at the original image's size, in worker processes so that it overlaps the network.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from converter.errors import CaffeError


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two kernels' weights and standard deviations (pixels, intensity levels)."""

    iterations: int = 10
    bilateral_weight: float = 4.0
    bilateral_xy_std: float = 67.0
    bilateral_rgb_std: float = 3.0
    position_weight: float = 3.0
    position_xy_std: float = 1.0


def require_pydensecrf() -> None:
    """Fail early, in one line, when the optional `crf` extra is not installed."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise CaffeError("--crf needs the optional extra: pip install 'caffe2torch[crf]' (pydensecrf2)") from None


def dense_crf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refined labels (HxW uint8) from an HxWx3 uint8 image and CxHxW class probabilities.

    The bilateral kernel uses one std for all three channels, so BGR and RGB give the same result.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    classes, height, width = probabilities.shape
    if image.shape[:2] != (height, width) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} does not match probabilities {probabilities.shape}")
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params.position_xy_std, compat=params.position_weight)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_xy_std,
        srgb=params.bilateral_rgb_std,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
        compat=params.bilateral_weight,
    )
    refined = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(classes, height, width)
    return refined.argmax(axis=0).astype(np.uint8)


class CRFWorkers:
    """Runs `dense_crf` in worker processes, at most `2 x workers` images in flight, results in submission order."""

    def __init__(self, params: CRFParams, workers: int) -> None:
        require_pydensecrf()
        self.params = params
        self.limit = 2 * max(1, workers)
        self.pool = ProcessPoolExecutor(max_workers=max(1, workers))
        self.pending: deque[tuple[Any, Future[np.ndarray]]] = deque()

    def submit(self, tag: Any, image: np.ndarray, probabilities: np.ndarray, done: Callable[[Any, np.ndarray], None]) -> None:
        """Queue one image; calls `done(tag, labels)` for finished ones (blocking while too many are queued)."""
        self.pending.append((tag, self.pool.submit(dense_crf, image, probabilities, self.params)))
        while len(self.pending) >= self.limit:
            self._finish_oldest(done)

    def drain(self, done: Callable[[Any, np.ndarray], None]) -> None:
        """Wait for every queued image."""
        while self.pending:
            self._finish_oldest(done)

    def _finish_oldest(self, done: Callable[[Any, np.ndarray], None]) -> None:
        tag, future = self.pending.popleft()
        done(tag, future.result())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
