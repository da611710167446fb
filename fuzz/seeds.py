"""The valid files every fuzz case starts from, made only from the project's synthetic nets.

One seed per input kind: a binary V2 caffemodel with its prototxt, the same weights as Caffe
HDF5, a V1 caffemodel (`layers` with enum types and legacy 4-D blobs), a reference activations
file and a converted checkpoint folder. Same arguments, same bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.hdf5 import write_hdf5_weights
from converter.caffe.schema import caffe_pb
from converter.checkpoint import MANIFEST_FILE, PTH_FILE, SAFETENSORS_FILE
from converter.cli import main as convert_main
from converter.synthetic.weights import write_synthetic_deeplab
from models.deeplab import ResNetConfig
from verify.activations import write_activations

# Smaller than ResNetConfig.tiny(): the same names and topology, files of a few hundred KiB,
# so a case converts in tens of milliseconds and a crashing case minimises to a small file.
SEED_CONFIG = ResNetConfig(blocks=(1, 1, 1, 1), stem_width=4, widths=(2, 4, 4, 8))
SEED_INPUT = (33, 33)  # an aligned size (32k+1): all three towers' score maps line up
SEED_INDEX_FILE = "seeds.json"

CAFFEMODEL, PROTOTXT, HDF5, V1_CAFFEMODEL, REFERENCE = (
    "train_iter_20000.caffemodel", "test.prototxt", "weights.caffemodel.h5", "v1.caffemodel", "reference.h5")
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class Seeds:
    """Where the seed files lie; every kind's target reads the good files from here."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    def checkpoint_file(self, member: str) -> Path:
        return self.folder / CHECKPOINT_DIR / member


def make_seeds(folder: str | Path) -> Seeds:
    """Write every seed into `folder` (reused when an earlier call already wrote them)."""
    out = Path(folder)
    index = out / SEED_INDEX_FILE
    if index.is_file():
        return Seeds(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_synthetic_deeplab(out, "msc_test", SEED_CONFIG, seed=0, input_size=SEED_INPUT)
    net = read_caffemodel(files.caffemodel)
    write_hdf5_weights(out / HDF5, {layer.name: layer.blobs for layer in net.layers if layer.blobs})
    (out / V1_CAFFEMODEL).write_bytes(v1_net_bytes())
    with contextlib.redirect_stdout(io.StringIO()):  # the command's report is not the harness's
        code = convert_main(["convert", "--quiet", "--caffemodel", str(files.caffemodel), "--prototxt",
                             str(files.prototxt), "--out", str(out / CHECKPOINT_DIR)])
    if code != 0:
        raise RuntimeError(f"the seed checkpoint did not convert (exit {code})")
    write_reference(out / REFERENCE)
    index.write_text(json.dumps({"config": [list(SEED_CONFIG.blocks), SEED_CONFIG.stem_width,
                                            list(SEED_CONFIG.widths)]}) + "\n")
    return Seeds(out)


def v1_net_bytes() -> bytes:
    """A small LeNet-like V1 net (`layers`, enum types, legacy num/channels/height/width blobs)."""
    pb = caffe_pb()
    v1 = pb.V1LayerParameter
    rng = np.random.default_rng(0)
    net = pb.NetParameter(name="lenet_v1", input=["data"], input_dim=[1, 1, 12, 12])

    def add(name: str, kind: int, bottom: str, top: str, *shapes: tuple[int, int, int, int]) -> object:
        layer = net.layers.add(name=name, type=kind, bottom=[bottom], top=[top])
        for num, channels, height, width in shapes:
            values = rng.standard_normal(num * channels * height * width).astype(np.float32)
            layer.blobs.add(num=num, channels=channels, height=height, width=width, data=values.tolist())
        return layer

    conv = add("conv1", v1.CONVOLUTION, "data", "conv1", (4, 1, 3, 3), (1, 1, 1, 4))
    conv.convolution_param.num_output = 4
    conv.convolution_param.kernel_size.append(3)
    pool = add("pool1", v1.POOLING, "conv1", "pool1")
    pool.pooling_param.pool, pool.pooling_param.kernel_size, pool.pooling_param.stride = 0, 2, 2
    add("relu1", v1.RELU, "pool1", "pool1")
    ip = add("ip1", v1.INNER_PRODUCT, "pool1", "ip1", (1, 1, 10, 100), (1, 1, 1, 10))
    ip.inner_product_param.num_output = 10
    add("prob", v1.SOFTMAX, "ip1", "prob")
    return net.SerializeToString()


def write_reference(path: Path) -> Path:
    """A small reference activations file in the project's layout (values need not match a model)."""
    rng = np.random.default_rng(1)
    blobs = {name: rng.standard_normal(shape).astype(np.float32)
             for name, shape in (("conv1", (1, 4, 17, 17)), ("pool1", (1, 4, 9, 9)), ("res2a", (1, 8, 9, 9)),
                                 ("res3a", (1, 16, 5, 5)), ("fc1_voc12", (1, 21, 5, 5)))}
    inputs = {"data": rng.standard_normal((1, 3, *SEED_INPUT)).astype(np.float32)}
    return write_activations(path, producer="fuzz seed", prototxt='name: "seed"\n', inputs=inputs, blobs=blobs)


CHECKPOINT_MEMBERS = (MANIFEST_FILE, SAFETENSORS_FILE, PTH_FILE)
