"""export-onnx for DeepLab: Caffe's semantics in onnxruntime, the self-check, the sidecar, `verify --onnx`, bad input.

The DeepLab export is traced once per module on a micro configuration (one block per stage: the same
topology, Interps and fusion as the release, in a third of the tiny config's export time).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from converter.checkpoint import SAFETENSORS_FILE, read_manifest, sha256_file
from converter.cli import main as converter_main
from converter.errors import CaffeError
from converter.export.onnx import DEFAULT_OPSET, check_pooling_opset, export_onnx
from converter.export.record import read_sidecar, sidecar_path
from converter.synthetic.weights import write_synthetic_deeplab
from models.caffe_layers import caffe_pool_output_size
from models.deeplab import ResNetConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MICRO = ResNetConfig(blocks=(1, 1, 1, 1), stem_width=4, widths=(2, 2, 2, 4))
REFERENCE_SIZE = (65, 65)  # aligned (32k+1): the OpenCV reference runs fast at this size
REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = converter_main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted micro DeepLab checkpoint and its dynamic-size, all-outputs ONNX export (via the CLI)."""
    root = tmp_path_factory.mktemp("export_onnx")
    files = write_synthetic_deeplab(root / "caffe", "msc_test", MICRO, input_size=REFERENCE_SIZE)
    checkpoint = root / "checkpoint"
    code, _, err = _run(["convert", "--caffemodel", str(files.caffemodel), "--prototxt", str(files.prototxt),
                         "--out", str(checkpoint), "-q"])
    assert code == 0, err
    onnx_path = root / "deeplab.onnx"
    code, printed, err = _run(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(onnx_path),
                               "--dynamic-size", "--outputs", "all"])
    assert code == 0, err
    return {"root": root, "prototxt": files.prototxt, "caffemodel": files.caffemodel, "checkpoint": checkpoint,
            "onnx": onnx_path, "printed": printed}


def test_export_onnx_checks_itself_at_321_513_and_non_square(micro: dict[str, Path]) -> None:
    record = read_sidecar(micro["onnx"])
    checks = record["check"]["outputs"]
    assert {tuple(c["size"]) for c in checks} == {(321, 321), (513, 513), (321, 417)}
    assert {c["blob"] for c in checks} == {"fc1_voc12", "fc1_voc12_res075_interp", "fc1_voc12_res05", "fc_fusion"}
    assert all(0.0 < c["ratio"] <= 1.0 for c in checks)
    assert "onnxruntime check passed at 321x321, 321x417, 513x513" in micro["printed"]


def test_export_onnx_sidecar_names_the_source_checkpoint_and_its_sha256(micro: dict[str, Path]) -> None:
    record = read_sidecar(micro["onnx"])
    checkpoint = micro["checkpoint"]
    assert record["source"]["checkpoint"] == str(checkpoint.resolve())
    assert record["source"]["sha256"][SAFETENSORS_FILE] == read_manifest(checkpoint)["files"][SAFETENSORS_FILE]
    assert record["output"]["sha256"] == sha256_file(micro["onnx"])
    assert record["opset"] == DEFAULT_OPSET


def test_export_onnx_graph_keeps_caffe_semantics(micro: dict[str, Path]) -> None:
    model = onnx.load(str(micro["onnx"]))
    nodes = model.graph.node
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes}
    pools = [attrs[n.name] for n in nodes if n.op_type == "MaxPool"]
    assert pools and all(p["ceil_mode"] == 1 and list(p["pads"]) == [1, 1, 1, 1] for p in pools)
    resizes = [attrs[n.name] for n in nodes if n.op_type == "Resize"]
    assert len(resizes) == 4 and all(r["coordinate_transformation_mode"] == b"align_corners" for r in resizes)
    assert all(r["mode"] == b"linear" for r in resizes)
    dilations = {tuple(attrs[n.name].get("dilations", (1, 1))) for n in nodes if n.op_type == "Conv"}
    assert {(2, 2), (4, 4), (6, 6), (12, 12), (18, 18), (24, 24)} <= dilations
    assert sum(n.op_type == "Max" for n in nodes) == 2
    props = {p.key: p.value for p in model.metadata_props}
    assert "32k+1 .. 32k+6" in props["caffe2torch.input_sizes"]
    assert props["caffe2torch.outputs"] == "fc1_voc12, fc1_voc12_res075_interp, fc1_voc12_res05, fc_fusion"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param


def test_export_onnx_dynamic_graph_refuses_a_misaligned_size_as_caffe_does(micro: dict[str, Path]) -> None:
    session = ort.InferenceSession(str(micro["onnx"]), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        session.run(None, {"data": np.zeros((1, 3, 107, 107), np.float32)})  # 107 = 32*3 + 11: not aligned
    fused = session.run(["fc_fusion"], {"data": np.zeros((1, 3, 97, 353), np.float32)})[0]
    assert fused.shape == (1, 21, 13, 45)


def test_verify_parity_onnx_against_the_opencv_reference(micro: dict[str, Path]) -> None:
    from converter.caffe.prototxt import read_prototxt
    from verify.opencv_reference import default_feed, produce_opencv_reference, require_opencv4

    require_opencv4()
    reference = produce_opencv_reference(micro["prototxt"], micro["caffemodel"],
                                         default_feed(read_prototxt(micro["prototxt"])), micro["root"] / "ref.h5")
    report_dir = micro["root"] / "onnx_parity"
    out, err = io.StringIO(), io.StringIO()
    from verify.cli import main as verify_main

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = verify_main(["--onnx", str(micro["onnx"]), "--reference", str(reference),
                            "--report-dir", str(report_dir)])
    assert code == 0, err.getvalue()
    assert "parity PASS" in out.getvalue() and "4 blobs" in out.getvalue()
    report = json.loads((report_dir / "report.json").read_text())
    assert {row["name"] for row in report["blobs"]} == {"fc1_voc12", "fc1_voc12_res075_interp", "fc1_voc12_res05",
                                                       "fc_fusion"}
    assert read_sidecar(micro["onnx"])["parity"]["verdict"] == "pass"


@pytest.mark.slow
def test_export_onnx_fixed_size_default_outputs_fused_only(micro: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    result = export_onnx(micro["checkpoint"], out, size=(97, 129))
    assert result.outputs == ("fc_fusion",)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["fc_fusion"]
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 97, 129]


class _Pools(nn.Module):
    """Every ceil-mode case under test as one graph: MAX and AVE (padded divisor) per (kernel, stride, pad)."""

    CASES = [(3, 2, 1), (2, 2, 1), (3, 2, 0), (3, 3, 1), (2, 3, 1), (4, 3, 2), (3, 2, 2), (5, 3, 2)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for k, s, p in self.CASES:
            out.append(F.max_pool2d(x, k, s, p, ceil_mode=True) if 2 * p <= k else x[..., :1, :1])
            out.append(F.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=True) if 2 * p <= k
                       else x[..., :1, :1])
        return tuple(out)


def _caffe_pool(x: np.ndarray, k: int, s: int, p: int, method: str) -> np.ndarray:
    """Caffe's pooling_layer.cpp in numpy: ceil output with the last-window clip, AVE over the window clipped to
    the padded image (padding counts, the overhang past it does not)."""
    height, width = x.shape[-2:]
    out_h, out_w = caffe_pool_output_size(height, k, s, p), caffe_pool_output_size(width, k, s, p)
    out = np.zeros(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            h0, w0 = i * s - p, j * s - p
            h1, w1 = min(h0 + k, height + p), min(w0 + k, width + p)
            window = x[..., max(h0, 0):min(h1, height), max(w0, 0):min(w1, width)]
            out[..., i, j] = window.max(axis=(-2, -1)) if method == "MAX" else window.sum(axis=(-2, -1)) / (
                (h1 - h0) * (w1 - w0))
    return out


@pytest.mark.parametrize("height,width", [(10, 11), (7, 12)])
def test_onnxruntime_ceil_pooling_with_pad_matches_caffe(tmp_path: Path, height: int, width: int) -> None:
    x = torch.randn(1, 2, height, width)
    path = tmp_path / "pools.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(_Pools().eval(), (x,), str(path), dynamo=True, opset_version=DEFAULT_OPSET, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    clipped = 0
    for index, (k, s, p) in enumerate(_Pools.CASES):
        if 2 * p > k:
            continue
        for method, value in zip(("MAX", "AVE"), values[2 * index: 2 * index + 2]):
            expected = _caffe_pool(x.numpy().astype(np.float64), k, s, p, method)
            assert value.shape == expected.shape, (method, k, s, p)
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=f"{method} k{k} s{s} p{p}")
        clipped += any(math.ceil((n + 2 * p - k) / s) + 1 != caffe_pool_output_size(n, k, s, p)
                       for n in (height, width))
    assert clipped  # the sizes include the case where Caffe drops a window starting in the padding


def test_export_refuses_old_opset_for_pooling_that_can_start_in_the_padding() -> None:
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True))  # pad 1 < 3 - 2 + 1: never starts in the padding
    check_pooling_opset(model, 17)
    clipping = nn.Sequential(nn.AvgPool2d(2, 2, 1, ceil_mode=True))  # pad 1 >= 2 - 2 + 1
    with pytest.raises(CaffeError, match="opset 22"):
        check_pooling_opset(clipping, 18)
    check_pooling_opset(clipping, DEFAULT_OPSET)


def test_export_onnx_bad_input_is_one_line_exit_2_nothing_written(micro: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (["--size", "107", "107"], "does not align"),
        (["--opset", "12"], "opset 18 or later"),
    ]
    for extra, expected in cases:
        out = tmp_path / "bad.onnx"
        code, _, err = _run(["export-onnx", "--checkpoint", str(micro["checkpoint"]), "--out", str(out), *extra])
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert list(tmp_path.iterdir()) == []
    code, _, err = _run(["export-onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")])
    assert code == 2 and err.count("\n") == 1
    code, _, err = _run(["export-onnx", "--checkpoint", str(micro["checkpoint"]), "--out",
                         str(tmp_path / "no_such_folder" / "m.onnx")])
    assert code == 2 and "missing or not writable" in err and not (tmp_path / "no_such_folder").exists()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):
            code, _, err = _run(["export-onnx", "--checkpoint", str(micro["checkpoint"]), "--out",
                                 str(readonly / "m.onnx")])
            assert code == 2 and "not writable" in err and list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o700)


def test_export_onnx_without_onnxruntime_says_how_to_install(micro: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "onnxruntime.py").write_text("raise ImportError('onnxruntime is blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    out = tmp_path / "m.onnx"
    done = subprocess.run([sys.executable, "-m", "converter", "export-onnx", "--checkpoint", str(micro["checkpoint"]),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: onnxruntime is not installed") and "caffe2torch[onnx]" in done.stderr
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.slow
def test_export_onnx_full_size_dynamic_all_outputs(tmp_path: Path) -> None:
    files = write_synthetic_deeplab(tmp_path / "caffe", "msc_test", ResNetConfig.resnet101())
    checkpoint = tmp_path / "checkpoint"
    assert _run(["convert", "--caffemodel", str(files.caffemodel), "--out", str(checkpoint), "-q"])[0] == 0
    result = export_onnx(checkpoint, tmp_path / "deeplab.onnx", dynamic_size=True, outputs="all")
    assert {c.size for c in result.checks} == {(321, 321), (513, 513), (321, 417)}
    assert all(c.passed for c in result.checks)
