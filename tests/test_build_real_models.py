"""The real trained models in ../shared/reference/caffe_models build and run (V1 and V2 files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converter.caffe.load import load_net
from converter.layers import build_net

MODELS = {
    "lenet_v1": ("lenet_mnist_v1/lenet.prototxt", "lenet_mnist_v1/lenet_iter_10000.caffemodel", {"prob": (64, 10)}),
    "lenet_v2": ("lenet_mnist_v2/lenet.prototxt", "lenet_mnist_v2/lenet_iter_10000.caffemodel", {"prob": (64, 10)}),
    "cifar10_quick": ("cifar10_quick_v1/cifar10_quick.prototxt", "cifar10_quick_v1/cifar10_quick_iter_5000.caffemodel",
                      {"prob": (1, 10)}),
    "cifar10_full": ("cifar10_full_v1/cifar10_full.prototxt", "cifar10_full_v1/cifar10_full_iter_70000.caffemodel",
                     {"prob": (1, 10)}),
    "mtcnn_pnet": ("mtcnn_v1/det1.prototxt", "mtcnn_v1/det1.caffemodel", {"conv4-2": (1, 4, 1, 1), "prob1": (1, 2, 1, 1)}),
    "mtcnn_rnet": ("mtcnn_v1/det2.prototxt", "mtcnn_v1/det2.caffemodel", {"conv5-2": (1, 4), "prob1": (1, 2)}),
    "mtcnn_onet": ("mtcnn_v1/det3.prototxt", "mtcnn_v1/det3.caffemodel",
                   {"conv6-2": (1, 4), "conv6-3": (1, 10), "prob1": (1, 2)}),
    "ultraface": ("ultraface_rfb320_dilated/RFB-320.prototxt", "ultraface_rfb320_dilated/RFB-320.caffemodel",
                  {"boxes": (1, 4420, 4), "scores": (1, 4420, 2)}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_builds_and_runs(shared_reference: Path, name: str) -> None:
    prototxt, caffemodel, outputs = MODELS[name]
    folder = shared_reference / "caffe_models"
    net = build_net(load_net(folder / caffemodel, folder / prototxt))
    rng = np.random.default_rng(0)
    feeds = {k: torch.from_numpy(rng.uniform(-1, 1, s).astype(np.float32)) for k, s in net.graph.inputs.items()}
    with torch.no_grad():
        out = net.run(feeds)
    assert {k: tuple(v.shape) for k, v in out.items()} == outputs
    assert all(torch.isfinite(v).all() for v in out.values())
    if "prob" in out or "prob1" in out:
        probs = out.get("prob", out.get("prob1"))
        assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)


def test_v1_and_v2_lenet_agree(shared_reference: Path) -> None:
    """The same LeNet saved by old (V1, legacy 4-D blobs) and new Caffe builds to the same function."""
    folder = shared_reference / "caffe_models"
    v1 = build_net(load_net(folder / MODELS["lenet_v1"][1], folder / MODELS["lenet_v1"][0]))
    v2 = build_net(load_net(folder / MODELS["lenet_v2"][1], folder / MODELS["lenet_v2"][0]))
    assert [i.type for i in v1.graph.layers] == [i.type for i in v2.graph.layers]
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        a, b = v1(x)["prob"], v2(x)["prob"]
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()


def test_ultraface_matches_its_onnx_twin(shared_reference: Path) -> None:
    """The authors' ONNX file is the source of the caffemodel: onnxruntime on it is an independent oracle."""
    ort = pytest.importorskip("onnxruntime")
    folder = shared_reference / "caffe_models" / "ultraface_rfb320_dilated"
    net = build_net(load_net(folder / "RFB-320.caffemodel", folder / "RFB-320.prototxt"))
    session = ort.InferenceSession(str(folder / "version-RFB-320_simplified.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    image = ((rng.uniform(0, 255, (1, 3, 240, 320)) - 127) / 128).astype(np.float32)
    (feed,) = session.get_inputs()
    theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {feed.name: image})))
    with torch.no_grad():
        ours = net(torch.from_numpy(image))
    for name in ("scores", "boxes"):
        np.testing.assert_allclose(ours[name].numpy(), theirs[name], atol=1e-4, rtol=1e-4)
