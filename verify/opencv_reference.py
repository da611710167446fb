"""The `opencv` reference producer: runs a Caffe net in OpenCV 4.x dnn on the CPU and records its blobs.

OpenCV is an independent Caffe implementation (its Caffe layer tests compare against real Caffe), so
its blobs are the oracle CI and `make demo` verify against. Fusion and Winograd are turned off so that
every blob is its layer's own fp32 result. OpenCV names outputs by layer, so a top written in place by
several layers (conv -> BatchNorm -> Scale -> ReLU) is read from the last of them: the value Caffe
holds when the forward pass ends. OpenCV's Interp ignores `shrink_factor` (and pads), so every Interp
using shrink_factor is rewritten to the explicit height/width Caffe computes; the file's `producer`
says so, while its `prototxt` keeps the text the user gave.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf import text_format

from converter.errors import CaffeError
from converter.caffe.netdesc import Net
from converter.caffe.params import interp_params
from converter.caffe.load import load_net
from converter.caffe.prototxt import parse_prototxt_text, read_prototxt
from models.interp import caffe_interp_size
from verify.activations import write_activations
from verify.inputs import caffe_preprocess, check_input_size, load_image, synthetic_image

log = logging.getLogger(__name__)

# Residual block outputs are Eltwise tops named res<stage><block>[<tower suffix>], e.g. res4b22_res075.
_RES_BLOCK = re.compile(r"^res(?P<stage>\d+)[a-z]\d*(?P<tower>.*)$")


def require_opencv4() -> ModuleType:
    """The cv2 module, if it is an OpenCV 4.x (OpenCV 5 dropped the Caffe importer)."""
    try:
        import cv2
    except ImportError as exc:
        raise CaffeError(f"OpenCV is not installed ({exc}); install 'opencv-python-headless<5'") from None
    major = int(cv2.__version__.split(".")[0])
    if major != 4:
        raise CaffeError(
            f"OpenCV {cv2.__version__} cannot read Caffe nets (the Caffe importer exists in 4.x only); "
            "install 'opencv-python-headless<5'"
        )
    return cv2


@dataclass(frozen=True)
class BlobGraph:
    """Where each top blob of a net comes from: forward order and the layer that writes its final value.

    A declared input is a top blob only if some layer writes it (in place); otherwise its value is the
    feed, which the file keeps under /inputs (as the Caffe exporter does).
    """

    inputs: tuple[str, ...]  # declared inputs, in the order OpenCV numbers them
    order: tuple[str, ...]  # every top blob, in the order a layer first produces it
    last_writer: Mapping[str, tuple[str, int]]  # blob -> (layer name, top index) of its last writer

    @classmethod
    def of(cls, net: Net) -> BlobGraph:
        order: list[str] = []
        last_writer: dict[str, tuple[str, int]] = {}
        seen_layers: set[str] = set()
        for layer in net.layers:
            if layer.type == "Input":  # OpenCV makes Input layers net inputs, not layers
                continue
            if layer.name in seen_layers:
                raise CaffeError("layer name used twice; OpenCV addresses outputs by layer name", path=net.path,
                                 layer=layer.name)
            seen_layers.add(layer.name)
            for index, top in enumerate(layer.tops):
                if top not in last_writer:
                    order.append(top)
                last_writer[top] = (layer.name, index)
        return cls(tuple(net.inputs), tuple(order), last_writer)


def stage_blobs(net: Net) -> list[str]:
    """The "stages" subset: the stage-level blobs of a DeepLab-like net, in forward order.

    - the stem: the tops of the first Convolution (conv1) and the first Pooling (pool1);
    - the last residual block of each stage of the full-resolution tower (res2c, res3b3, res4b22, res5c
      for ResNet-101; found by the naming rule res<stage><block>, so any depth works);
    - every Interp top (data_res075, data_res05, the upsampled tower heads, fc1_interp);
    - every other Eltwise with its bottoms: each tower's ASPP sum and branches (fc1_voc12, c0..c3)
      and the MAX fusion fc_fusion.
    The scaled towers share the full tower's weights, so their inputs and heads pin them; their inner
    stages are left out so the file travels to the GPU machine (64 MiB a call): for ResNet-101 MSC at
    321x321 that is 27 blobs, 52 MB, 39 MB gzipped (`--compress`).
    """
    chosen: set[str] = set()
    stage_end: dict[str, str] = {}
    first_of_type: dict[str, str] = {}
    for layer in net.layers:
        if layer.type in ("Convolution", "Pooling") and layer.type not in first_of_type:
            first_of_type[layer.type] = layer.tops[0]
        elif layer.type == "Interp":
            chosen.update(layer.tops)
        elif layer.type == "Eltwise":
            block = _RES_BLOCK.match(layer.tops[0])
            if block is None:
                chosen.update(layer.tops)
                chosen.update(layer.bottoms)
            elif block["tower"] == "":
                stage_end[block["stage"]] = layer.tops[0]
    chosen.update(first_of_type.values())
    chosen.update(stage_end.values())
    ordered = [name for name in BlobGraph.of(net).order if name in chosen]
    if not ordered:
        raise CaffeError("no stage-level blobs found (no Interp, Eltwise, Convolution or Pooling layers)",
                         path=net.path)
    return ordered


def produce_opencv_reference(
    prototxt: str | Path,
    caffemodel: str | Path | None,
    inputs: Mapping[str, np.ndarray],
    out_path: str | Path,
    blobs: Sequence[str] | None = None,
    compression: str | None = None,
) -> Path:
    """Run the net in OpenCV dnn (CPU, fp32, no fusion, no Winograd) and write the reference file.

    `inputs` maps every declared input blob to its N,C,H,W value (the net is reshaped to these
    shapes); `blobs` picks the blobs to record (default: every blob). Returns `out_path`.
    """
    cv2 = require_opencv4()
    prototxt = Path(prototxt)
    # The project's reader sees the files first: OpenCV takes bytes that are no caffemodel (a PNG) for
    # an empty one, and blames the prototxt for a bad caffemodel; load_net names the file at fault.
    if caffemodel is not None:
        load_net(weights=caffemodel, prototxt=prototxt)
    net = read_prototxt(prototxt)
    text = prototxt.read_text(encoding="utf-8")
    graph = BlobGraph.of(net)
    feeds = _check_feeds(graph, inputs, prototxt)
    wanted = _check_wanted(graph, blobs, prototxt)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opencv_reference.") as tmp:
        net_param = parse_prototxt_text(text, path=prototxt)
        rewritten = rewrite_shrink_interps(cv2, net_param, graph, feeds, caffemodel, Path(tmp), prototxt)
        run_text = text_format.MessageToString(net_param) if rewritten else text
        run_path = Path(tmp) / "run.prototxt"
        run_path.write_text(run_text, encoding="utf-8")
        values = _forward(cv2, run_path, caffemodel, graph, feeds, wanted, prototxt)
    log.info("OpenCV forward of %s: %d blobs in %.1f s", prototxt.name, len(values), time.perf_counter() - started)
    producer = f"opencv {cv2.__version__} dnn (CPU, fp32, fusion off, winograd off)"
    if rewritten:
        sizes = ", ".join(f"{name} {h}x{w}" for name, (h, w) in rewritten.items())
        producer += f"; Interp shrink_factor rewritten to explicit height/width ({sizes})"
    return write_activations(out_path, producer=producer, prototxt=text, inputs=feeds, blobs=values,
                             order=wanted, compression=compression)


def _check_feeds(graph: BlobGraph, inputs: Mapping[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    missing = [name for name in graph.inputs if name not in inputs]
    extra = [name for name in inputs if name not in graph.inputs]
    if missing or extra:
        raise CaffeError(
            f"inputs given ({', '.join(inputs) or 'none'}) do not match the net's declared inputs "
            f"({', '.join(graph.inputs) or 'none'})",
            path=path,
        )
    return {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in graph.inputs}


def _check_wanted(graph: BlobGraph, blobs: Sequence[str] | None, path: Path) -> list[str]:
    if blobs is None:
        return list(graph.order)
    unknown = [name for name in blobs if name not in graph.last_writer]
    if unknown:
        inputs = [name for name in unknown if name in graph.inputs]
        note = f" ({', '.join(inputs)}: net input, kept under /inputs)" if inputs else ""
        raise CaffeError(f"no layer of the net produces {', '.join(repr(n) for n in unknown[:5])}{note}", path=path)
    wanted = set(blobs)
    return [name for name in graph.order if name in wanted]


def _load_net(cv2: ModuleType, prototxt: Path, caffemodel: str | Path | None, shown_as: Path) -> Any:
    """The net in OpenCV, on the plain CPU backend, with fusion and Winograd off."""
    try:
        if caffemodel is None:
            net = cv2.dnn.readNetFromCaffe(str(prototxt))
        else:
            net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    except cv2.error as exc:
        raise CaffeError(f"OpenCV cannot load the net: {_cv_message(exc)}", path=shown_as) from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(False)
    if hasattr(net, "enableWinograd"):  # OpenCV >= 4.7; older releases have no Winograd path
        net.enableWinograd(False)
    return net


def _cv_message(exc: Exception) -> str:
    """The useful part of a cv2.error: its last line without the source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def rewrite_shrink_interps(
    cv2: ModuleType,
    net_param: Any,
    graph: BlobGraph,
    feeds: Mapping[str, np.ndarray],
    caffemodel: str | Path | None,
    tmp: Path,
    shown_as: Path,
) -> dict[str, tuple[int, int]]:
    """Give every Interp in `net_param` (a parsed NetParameter, edited in place) that uses shrink_factor
    the explicit height/width Caffe computes for inputs shaped like `feeds`; returns them by layer name.

    OpenCV dnn cannot read shrink_factor, so a net must pass through this before OpenCV loads it
    (the reference generator here, the OpenCV benchmarks in benchmarks/opencv_net.py). Interp pads,
    which OpenCV cannot do, are a CaffeError naming `shown_as`; `tmp` holds truncated nets.

    Processed in layer order: a bottom's shape comes from the fed inputs or from OpenCV's own shape
    inference on the net truncated just before the Interp (earlier Interps already rewritten).
    """
    known = {name: tuple(value.shape) for name, value in feeds.items()}
    rewritten: dict[str, tuple[int, int]] = {}
    for index, layer in enumerate(net_param.layer):
        if layer.type != "Interp":
            continue
        params = interp_params(layer)
        if params["pad_beg"] or params["pad_end"]:
            raise CaffeError(
                f"Interp pads ({params['pad_beg']}, {params['pad_end']}) crop the input; OpenCV's Interp cannot do that",
                path=shown_as,
                layer=layer.name,
            )
        if not layer.interp_param.HasField("shrink_factor"):
            continue
        bottom = layer.bottom[0]
        if bottom not in known:
            known.update(_shapes_before(cv2, net_param, index, graph, feeds, caffemodel, tmp, shown_as))
        shape = known[bottom]
        if len(shape) != 4:
            raise CaffeError(f"Interp bottom '{bottom}' has shape {shape}, expected N,C,H,W", path=shown_as,
                             layer=layer.name)
        try:
            size = caffe_interp_size(shape[2], shape[3], **params)
        except ValueError as exc:
            raise CaffeError(str(exc), path=shown_as, layer=layer.name) from None
        layer.ClearField("interp_param")
        layer.interp_param.height, layer.interp_param.width = size
        rewritten[layer.name] = size
        log.info("Interp %s: shrink_factor rewritten to height %d, width %d", layer.name, *size)
    return rewritten


def _shapes_before(
    cv2: ModuleType,
    net_param: Any,
    stop: int,
    graph: BlobGraph,
    feeds: Mapping[str, np.ndarray],
    caffemodel: str | Path | None,
    tmp: Path,
    shown_as: Path,
) -> dict[str, tuple[int, ...]]:
    """Blob shapes OpenCV infers for the net cut before layer `stop` (each blob after its last writer there)."""
    truncated = type(net_param)()
    truncated.CopyFrom(net_param)
    del truncated.layer[stop:]
    path = tmp / f"truncated_{stop}.prototxt"
    path.write_text(text_format.MessageToString(truncated), encoding="utf-8")
    net = _load_net(cv2, path, caffemodel, shown_as)
    try:
        ids, _, out_shapes = net.getLayersShapes([list(feeds[name].shape) for name in graph.inputs])
    except cv2.error as exc:
        raise CaffeError(f"OpenCV shape inference failed: {_cv_message(exc)}", path=shown_as) from None
    by_id = {int(i): [tuple(int(d) for d in s) for s in shapes] for i, shapes in zip(ids, out_shapes)}
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in truncated.layer:  # file order, so a later in-place writer's shape wins
        layer_id = net.getLayerId(layer.name)
        for index, top in enumerate(layer.top):
            if layer_id in by_id and index < len(by_id[layer_id]):
                shapes[top] = by_id[layer_id][index]
    return shapes


def _forward(
    cv2: ModuleType,
    run_prototxt: Path,
    caffemodel: str | Path | None,
    graph: BlobGraph,
    feeds: Mapping[str, np.ndarray],
    wanted: Sequence[str],
    shown_as: Path,
) -> dict[str, np.ndarray]:
    """One forward pass asking OpenCV for the last writer of every wanted blob."""
    net = _load_net(cv2, run_prototxt, caffemodel, shown_as)
    writers = list(dict.fromkeys(graph.last_writer[name][0] for name in wanted))
    absent = [name for name in writers if net.getLayerId(name) < 0]
    if absent:
        raise CaffeError(f"OpenCV's net has no layer {', '.join(repr(n) for n in absent[:5])}", path=shown_as)
    for name, value in feeds.items():
        net.setInput(value, name)
    try:
        outputs = dict(zip(writers, net.forwardAndRetrieve(writers))) if writers else {}
    except cv2.error as exc:
        raise CaffeError(f"OpenCV forward failed: {_cv_message(exc)}", path=shown_as) from None
    values: dict[str, np.ndarray] = {}
    for name in wanted:
        layer, index = graph.last_writer[name]
        values[name] = np.asarray(outputs[layer][index], dtype=np.float32)
    return values


def default_feed(net: Net, image: str | Path | None = None, size: tuple[int, int] | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """The single image input of an image net, preprocessed as Caffe's data layer does.

    A real picture (`image`) is padded with the mean up to the declared input size (DeepLab's test
    nets pad to 513) or fed at its own size when larger; otherwise the synthetic image is drawn at
    `size` or, by default, at the declared input size.
    """
    if len(net.inputs) != 1:
        raise CaffeError(f"the net declares {len(net.inputs)} inputs; this command feeds one image", path=net.path)
    name, dims = next(iter(net.inputs.items()))
    if len(dims) != 4 or dims[1] != 3:
        raise CaffeError(f"input '{name}' has dims {dims}; this command feeds a 1x3xHxW image", path=net.path)
    check_input_size((1, 3, *(size or dims[2:])), net.path, f"input '{name}'")
    if image is not None:
        picture = load_image(image)
        pad_to = (max(dims[2], picture.shape[0]), max(dims[3], picture.shape[1]))
        return {name: caffe_preprocess(picture, pad_to=pad_to)}
    height, width = size if size is not None else dims[2:]
    return {name: caffe_preprocess(synthetic_image(height, width, seed=seed))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verify.opencv_reference",
        description="Run a Caffe net in OpenCV 4.x dnn (CPU) and write a reference activations file.",
    )
    parser.add_argument("--prototxt", required=True, type=Path)
    parser.add_argument("--caffemodel", type=Path, help="weights (omit for a net without parameters)")
    parser.add_argument("--out", required=True, type=Path, help="reference activations file to write (.h5)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="a real picture (default: the synthetic image)")
    source.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="synthetic image size (default: the net's declared input size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic image")
    parser.add_argument("--blobs", help="comma-separated blob names, or 'stages' (default: every blob)")
    parser.add_argument("--compress", action="store_true", help="gzip the datasets (for files that travel)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        net = read_prototxt(args.prototxt)
        if args.blobs == "stages":
            blobs: list[str] | None = stage_blobs(net)
        elif args.blobs:
            blobs = [name.strip() for name in args.blobs.split(",") if name.strip()]
        else:
            blobs = None
        feeds = default_feed(net, args.image, tuple(args.size) if args.size else None, args.seed)
        out = produce_opencv_reference(args.prototxt, args.caffemodel, feeds, args.out, blobs=blobs,
                                       compression="gzip" if args.compress else None)
    except CaffeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB, {len(blobs) if blobs is not None else 'all'} blobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
