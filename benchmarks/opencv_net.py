"""A Caffe net loaded into OpenCV 4.x dnn for timing (the runtime Caffe users have today), shared by the benchmarks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from converter.caffe.prototxt import parse_prototxt_text, read_prototxt


def load_opencv_net(prototxt: Path, caffemodel: Path, feed: np.ndarray, *, fusion: bool = True) -> Any:
    """`cv2.dnn.Net` of the Caffe files on the plain CPU backend, its Interp `shrink_factor` layers given the
    explicit sizes Caffe computes for an input shaped like `feed` (OpenCV cannot read shrink_factor)."""
    import cv2
    from google.protobuf import text_format

    from verify.opencv_reference import BlobGraph, rewrite_shrink_interps

    net_def = read_prototxt(prototxt)
    feeds = {next(iter(net_def.inputs)): feed}
    with tempfile.TemporaryDirectory(prefix="opencv_net.") as tmp:
        net_param = parse_prototxt_text(prototxt.read_text(encoding="utf-8"), path=prototxt)
        rewrite_shrink_interps(cv2, net_param, BlobGraph.of(net_def), feeds, caffemodel, Path(tmp), prototxt)
        run_path = Path(tmp) / "run.prototxt"
        run_path.write_text(text_format.MessageToString(net_param), encoding="utf-8")
        net = cv2.dnn.readNetFromCaffe(str(run_path), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(fusion)
    return net
