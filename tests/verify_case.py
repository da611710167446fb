"""The shared case of the verification tests: a tiny synthetic DeepLab-v2 MSC net, its honest
checkpoint and its OpenCV reference, built once per test session.

65x67: both axes align the multi-scale fusion, and 67 is a size where pool1's ceil and floor
rounding differ (conv1 gives 34 columns: ceil 18, floor 17).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from converter.checkpoint import read_checkpoint
from converter.cli import main as convert_main
from converter.errors import CaffeError
from converter.caffe.load import load_net
from converter.caffe.prototxt import read_prototxt
from converter.synthetic.weights import SyntheticFiles, write_synthetic_deeplab
from models.deeplab import ResNetConfig
from verify.activations import read_activations
from verify.compare import ModelSpec, verify_state_dict
from verify.opencv_reference import default_feed, produce_opencv_reference, require_opencv4
from verify.result import VerificationResult

INPUT_SIZE = (65, 67)


@dataclass(frozen=True)
class TinyCase:
    files: SyntheticFiles
    checkpoint: Path
    reference: Path
    state_dict: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    spec: ModelSpec
    bn_factors: dict[str, float]  # Caffe BatchNorm layer -> its moving-average factor

    def verify(self, state_dict: dict[str, torch.Tensor] | None = None, *, spec: ModelSpec | None = None,
               reference: Path | None = None, **options: Any) -> VerificationResult:
        with read_activations(reference or self.reference) as ref:
            return verify_state_dict(state_dict or self.state_dict, spec or self.spec, ref, source="test", **options)


_CASES: dict[str, TinyCase] = {}


def tiny_case(factory: pytest.TempPathFactory) -> TinyCase:
    """The session's tiny case (built on first use)."""
    if "tiny" not in _CASES:
        _CASES["tiny"] = _build(factory.mktemp("verify_tiny"))
    return _CASES["tiny"]


def _build(root: Path) -> TinyCase:
    try:
        require_opencv4()
    except CaffeError as error:  # e.g. the GPU machine's OpenCV 5, which has no Caffe importer
        pytest.skip(f"no OpenCV reference: {error}")
    files = write_synthetic_deeplab(root / "caffe", "msc_test", ResNetConfig.tiny(), input_size=INPUT_SIZE)
    checkpoint = root / "checkpoint"
    with contextlib.redirect_stdout(io.StringIO()):
        code = convert_main(["convert", "--caffemodel", str(files.caffemodel), "--prototxt", str(files.prototxt),
                             "--out", str(checkpoint), "-q"])
    assert code == 0
    reference = produce_opencv_reference(files.prototxt, files.caffemodel, default_feed(read_prototxt(files.prototxt)),
                                         root / "reference.h5")
    state_dict, manifest = read_checkpoint(checkpoint)
    model = manifest["model"]
    spec = ModelSpec(ResNetConfig(**model["config"]), model["num_classes"], model["bn_eps"])
    net = load_net(weights=files.caffemodel, prototxt=files.prototxt)
    factors = {layer.name: float(layer.blobs[2][0]) for layer in net.layers if layer.type == "BatchNorm"}
    return TinyCase(files, checkpoint, reference, state_dict, manifest, spec, factors)
