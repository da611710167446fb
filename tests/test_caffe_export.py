"""caffe_docker/export_blobs.py, tested without Caffe: a stand-in for pycaffe's Net runs the logic.

The script runs inside the deeplab-v2 image under Python 2.7; here it runs under
Python 3, is compiled by a Python 2 interpreter when one is found, and is run
end to end by it when that interpreter also has numpy and h5py. Set PYTHON2 to
the interpreter and PYTHON2PATH to its PYTHONPATH to point the tests at one.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "caffe_docker"
SCRIPT = DOCKER_DIR / "export_blobs.py"
PATCH_SCRIPT = DOCKER_DIR / "patch_fork_for_cpu.sh"
FORK_COMMIT = "a11f8a26f75199e619004e9cdd96b1f8617d2376"


def _load_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("export_blobs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eb = _load_script()


class FakeBlob:
    """A pycaffe Blob: `.data` is the array, `.reshape(*shape)` reallocates it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.data = np.zeros(shape, np.float32)

    def reshape(self, *shape: int) -> None:
        self.data = np.zeros(shape, np.float32)


class FakeLayer:
    def __init__(self, layer_type: str) -> None:
        self.type = layer_type


class FakeNet:
    """pycaffe's Net as export_blobs uses it.

    Blobs are created in Caffe's Net::Init order: declared inputs first, then each
    layer's new tops; an in-place top reuses its blob. A step is
    (layer name, type, bottoms, tops, function of the bottom arrays -> top arrays).
    """

    def __init__(self, inputs: dict[str, tuple[int, ...]], steps: list) -> None:
        self.inputs = list(inputs)
        self.blobs = OrderedDict((name, FakeBlob(shape)) for name, shape in inputs.items())
        self._layer_names = [step[0] for step in steps]
        self.layers = [FakeLayer(step[1]) for step in steps]
        self._steps = steps
        for _, _, _, tops, _ in steps:
            for top in tops:
                self.blobs.setdefault(top, FakeBlob((0,)))
        self.reshape()
        self.forward_calls = 0

    def reshape(self) -> None:
        for _, _, bottoms, tops, _ in self._steps:
            shape = self.blobs[bottoms[0]].data.shape
            for top in tops:
                if self.blobs[top].data.shape != shape:
                    self.blobs[top].reshape(*shape)

    def forward(self) -> None:
        for _, _, bottoms, tops, function in self._steps:
            outputs = function(*[self.blobs[name].data for name in bottoms])
            for top, output in zip(tops, outputs):
                self.blobs[top].data[...] = output
        self.forward_calls += 1


SPLIT = "conv/1_scale%1_0_split"


def toy_net(data_shape: tuple[int, ...] = (1, 3, 4, 5)) -> FakeNet:
    """Two inputs, names with '/' and '%', in-place Scale and ReLU, and a Caffe-inserted Split."""
    steps = [
        ("conv/1", "Convolution", ["data"], ["conv/1"], lambda x: [2 * x]),
        ("scale%1", "Scale", ["conv/1"], ["conv/1"], lambda x: [3 * x]),
        (SPLIT, "Split", ["conv/1"], [SPLIT + "_0", SPLIT + "_1"], lambda x: [x, x]),
        ("branch/a", "Convolution", [SPLIT + "_0"], ["branch/a"], lambda x: [x + 1]),
        ("branch%b", "Eltwise", [SPLIT + "_1", "aux/gain"], ["branch%b"], lambda x, g: [x * g]),
        ("sum", "Eltwise", ["branch/a", "branch%b"], ["sum"], lambda a, b: [a + b]),
        ("relu", "ReLU", ["sum"], ["sum"], lambda x: [np.maximum(x, 0)]),
    ]
    return FakeNet({"data": data_shape, "aux/gain": (1, 1, 1, 1)}, steps)


def one_input_net() -> FakeNet:
    steps = [
        ("conv1", "Convolution", ["data"], ["conv1"], lambda x: [x - 1]),
        ("relu1", "ReLU", ["conv1"], ["conv1"], lambda x: [np.maximum(x, 0)]),
    ]
    return FakeNet({"data": (1, 3, 4, 5)}, steps)


def toy_inputs(shape: tuple[int, ...] = (1, 3, 4, 5)) -> OrderedDict:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return OrderedDict([("data", data), ("aux/gain", np.full((1, 1, 1, 1), 0.5, np.float32))])


def export_toy(path: Path, wanted=None, net: FakeNet | None = None) -> list[str]:
    net = net or toy_net()
    return eb.export(net, toy_inputs(), str(path), "fake caffe", "name: 'toy'\n", wanted)


def test_escape_name_writes_percent_before_slash() -> None:
    assert eb.escape_name("a%2Fb/c") == "a%252Fb%2Fc"
    for name in ("a%2Fb/c", "res4b22/x%", "%25/%2F", "plain"):
        assert eb.unescape_name(eb.escape_name(name)) == name


def test_reference_file_has_the_design_layout(tmp_path: Path) -> None:
    out = tmp_path / "ref.h5"
    export_toy(out)
    with h5py.File(out, "r") as handle:
        assert handle.attrs["format"] == "caffe-activations"
        assert handle.attrs["version"] == 1
        assert handle.attrs["producer"] == "fake caffe"
        assert handle.attrs["prototxt"] == "name: 'toy'\n"
        assert sorted(handle) == ["blobs", "inputs"]
        assert sorted(handle["inputs"]) == ["aux%2Fgain", "data"]
        assert handle["inputs"]["data"].shape == (1, 3, 4, 5)
        for key in handle["blobs"]:
            assert handle["blobs"][key].dtype == np.float32
            assert handle["blobs"][key].shape == (1, 3, 4, 5)


def test_missing_output_folder_is_created(tmp_path: Path) -> None:
    out = tmp_path / "build" / "reference" / "ref.h5"
    export_toy(out)
    assert out.is_file()


def test_order_follows_first_production_without_inputs_or_split_tops(tmp_path: Path) -> None:
    out = tmp_path / "ref.h5"
    names = export_toy(out)
    expected = ["conv/1", "branch/a", "branch%b", "sum"]
    assert names == expected
    with h5py.File(out, "r") as handle:
        assert list(handle["blobs"].attrs["order"]) == expected
        assert sorted(handle["blobs"]) == sorted(eb.escape_name(name) for name in expected)


def test_names_with_slash_and_percent_are_escaped_in_keys(tmp_path: Path) -> None:
    out = tmp_path / "ref.h5"
    export_toy(out)
    with h5py.File(out, "r") as handle:
        assert sorted(handle["blobs"]) == ["branch%25b", "branch%2Fa", "conv%2F1", "sum"]


def test_in_place_blobs_hold_their_value_after_the_last_writer(tmp_path: Path) -> None:
    out = tmp_path / "ref.h5"
    export_toy(out)
    data = toy_inputs()["data"]
    with h5py.File(out, "r") as handle:
        np.testing.assert_allclose(handle["blobs"]["conv%2F1"][...], 6 * data, rtol=1e-6)
        np.testing.assert_allclose(handle["blobs"]["branch%25b"][...], 3 * data, rtol=1e-6)
        expected_sum = np.maximum(9 * data + 1, 0)
        np.testing.assert_allclose(handle["blobs"]["sum"][...], expected_sum, rtol=1e-6)
        assert (handle["blobs"]["sum"][...] >= 0).all()


def test_blob_subset_is_written_in_net_order(tmp_path: Path) -> None:
    out = tmp_path / "ref.h5"
    names = export_toy(out, wanted=["sum", "conv/1"])
    assert names == ["conv/1", "sum"]
    with h5py.File(out, "r") as handle:
        assert list(handle["blobs"].attrs["order"]) == ["conv/1", "sum"]
        assert sorted(handle["blobs"]) == ["conv%2F1", "sum"]


def test_blob_subset_naming_an_unknown_blob_fails_before_running(tmp_path: Path) -> None:
    net = toy_net()
    with pytest.raises(eb.ExportError, match="fc1_voc12, data"):
        export_toy(tmp_path / "ref.h5", wanted=["sum", "fc1_voc12", "data"], net=net)
    assert net.forward_calls == 0
    assert not (tmp_path / "ref.h5").exists()


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    class BrokenBlob:
        @property
        def data(self):
            raise RuntimeError("device lost")

    class BreaksAfterForward(FakeNet):
        def forward(self) -> None:
            super().forward()
            self.blobs["sum"] = BrokenBlob()

    base = toy_net()
    net = BreaksAfterForward({"data": (1, 3, 4, 5), "aux/gain": (1, 1, 1, 1)}, base._steps)
    out = tmp_path / "ref.h5"
    out.write_bytes(b"previous reference")
    with pytest.raises(RuntimeError, match="device lost"):
        export_toy(out, net=net)
    assert out.read_bytes() == b"previous reference"
    assert sorted(os.listdir(tmp_path)) == ["ref.h5"]


def test_inputs_are_reused_from_an_existing_reference(tmp_path: Path) -> None:
    first = tmp_path / "first.h5"
    export_toy(first)
    net = toy_net()
    inputs = eb.load_inputs(str(first), eb.declared_input_shapes(net))
    assert list(inputs) == ["data", "aux/gain"]
    for name, array in toy_inputs().items():
        np.testing.assert_array_equal(inputs[name], array)
    second = tmp_path / "second.h5"
    eb.export(net, inputs, str(second), "again", "", None)
    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        for key in a["blobs"]:
            np.testing.assert_array_equal(a["blobs"][key][...], b["blobs"][key][...])


def test_reference_input_lacking_a_net_input_names_it(tmp_path: Path) -> None:
    ref = tmp_path / "ref.h5"
    eb.export(one_input_net(), OrderedDict([("data", toy_inputs()["data"])]), str(ref), "p", "", None)
    with pytest.raises(eb.ExportError, match="aux/gain"):
        eb.load_inputs(str(ref), eb.declared_input_shapes(toy_net()))


def test_reference_input_of_another_format_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs["format"] = "something-else"
        handle.create_group("inputs").create_dataset("data", data=np.zeros((1, 3, 4, 5), np.float32))
    with pytest.raises(eb.ExportError, match="not a caffe-activations version 1 file"):
        eb.load_inputs(str(other), eb.declared_input_shapes(one_input_net()))


def test_npy_input_feeds_a_one_input_net_and_is_refused_by_two(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.float64).reshape(1, 3, 4, 5)
    path = tmp_path / "in.npy"
    np.save(path, array)
    inputs = eb.load_inputs(str(path), eb.declared_input_shapes(one_input_net()))
    assert inputs["data"].dtype == np.float32
    np.testing.assert_array_equal(inputs["data"], array.astype(np.float32))
    with pytest.raises(eb.ExportError, match="data, aux/gain"):
        eb.load_inputs(str(path), eb.declared_input_shapes(toy_net()))


def test_input_with_the_wrong_channel_count_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.npy"
    np.save(path, np.zeros((1, 1, 4, 5), np.float32))
    with pytest.raises(eb.ExportError, match="1 channels, the net declares 3"):
        eb.load_inputs(str(path), eb.declared_input_shapes(one_input_net()))


def test_missing_input_file_is_named() -> None:
    with pytest.raises(eb.ExportError, match="nowhere.npy"):
        eb.load_inputs("nowhere.npy", eb.declared_input_shapes(one_input_net()))


def test_synthetic_input_is_seeded_and_mean_subtracted() -> None:
    shapes = eb.declared_input_shapes(one_input_net())
    first = eb.load_inputs("synthetic:7x9", shapes, seed=3)["data"]
    again = eb.load_inputs("synthetic:7x9", shapes, seed=3)["data"]
    other = eb.load_inputs("synthetic:7x9", shapes, seed=4)["data"]
    assert first.shape == (1, 3, 7, 9) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for channel, mean in enumerate(eb.BGR_MEAN):
        assert -mean <= first[0, channel].min() and first[0, channel].max() <= 255 - mean


def test_net_is_reshaped_to_the_input_shape(tmp_path: Path) -> None:
    net = one_input_net()
    data = np.ones((2, 3, 6, 7), np.float32) * 3
    out = tmp_path / "ref.h5"
    eb.export(net, OrderedDict([("data", data)]), str(out), "p", "", None)
    with h5py.File(out, "r") as handle:
        assert handle["inputs"]["data"].shape == (2, 3, 6, 7)
        np.testing.assert_array_equal(handle["blobs"]["conv1"][...], np.full((2, 3, 6, 7), 2.0))


def test_net_without_declared_inputs_is_explained() -> None:
    net = FakeNet({}, [])
    with pytest.raises(eb.ExportError, match="no Input layer"):
        eb.declared_input_shapes(net)


def test_prototxt_larger_than_an_hdf5_compact_attribute_round_trips(tmp_path: Path) -> None:
    text = "layer { name: 'x' }\n" * 20000  # about 400 kB, like the ResNet-101 MSC prototxt
    out = tmp_path / "ref.h5"
    eb.export(one_input_net(), OrderedDict([("data", toy_inputs()["data"])]), str(out), "p", text, None)
    with h5py.File(out, "r") as handle:
        assert handle.attrs["prototxt"] == text


def test_order_of_thousands_of_blobs_fits_in_the_file(tmp_path: Path) -> None:
    count = 4500  # past the 64 KiB a default HDF5 object header gives one attribute
    steps = [(f"l{i}", "ReLU", ["data"], [f"block{i}/out"], lambda x: [x]) for i in range(count)]
    net = FakeNet({"data": (1, 1, 1, 1)}, steps)
    out = tmp_path / "ref.h5"
    eb.export(net, OrderedDict([("data", np.ones((1, 1, 1, 1), np.float32))]), str(out), "p", "", None)
    with h5py.File(out, "r") as handle:
        order = list(handle["blobs"].attrs["order"])
    assert len(order) == count and order[-1] == f"block{count - 1}/out"


def test_project_reader_accepts_the_exported_file(tmp_path: Path) -> None:
    activations = pytest.importorskip("verify.activations")
    out = tmp_path / "ref.h5"
    export_toy(out)
    with activations.read_activations(out) as reference:
        assert reference.names == ["conv/1", "branch/a", "branch%b", "sum"]
        assert sorted(reference.inputs) == ["aux/gain", "data"]
        np.testing.assert_allclose(reference.get("conv/1"), 6 * toy_inputs()["data"], rtol=1e-6)


def _fake_caffe(calls: list) -> types.ModuleType:
    """A module with the pycaffe names main() uses; records what it was asked for."""
    caffe = types.ModuleType("caffe")
    caffe.TEST = 1
    caffe.__version__ = "1.0.0-rc3"
    caffe.set_mode_cpu = lambda: calls.append("cpu")
    caffe.set_mode_gpu = lambda: calls.append("gpu")
    caffe.set_device = lambda device: calls.append(("device", device))

    def net(prototxt: str, caffemodel: str, phase: int) -> FakeNet:
        calls.append(("net", Path(prototxt).name, Path(caffemodel).name, phase))
        return one_input_net()

    caffe.Net = net
    return caffe


def test_main_runs_the_net_in_test_phase_and_records_the_run(tmp_path: Path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "caffe", _fake_caffe(calls))
    monkeypatch.setenv("DEEPLAB_COMMIT", FORK_COMMIT)
    monkeypatch.setenv("DEEPLAB_CPU_ONLY", "1")
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text("input: 'data'\n", encoding="utf-8")
    caffemodel = tmp_path / "net.caffemodel"
    caffemodel.write_bytes(b"")
    out = tmp_path / "ref.h5"
    code = eb.main(["--prototxt", str(prototxt), "--caffemodel", str(caffemodel),
                    "--input", "synthetic:4x5", "--out", str(out), "--blobs", "conv1"])
    assert code == 0
    assert calls == ["cpu", ("net", "net.prototxt", "net.caffemodel", 1)]
    with h5py.File(out, "r") as handle:
        assert handle.attrs["prototxt"] == "input: 'data'\n"
        assert FORK_COMMIT in handle.attrs["producer"]
        assert "CPU_ONLY" in handle.attrs["producer"]
        assert list(handle["blobs"].attrs["order"]) == ["conv1"]


def test_main_refuses_gpu_in_a_cpu_only_image(tmp_path: Path, monkeypatch, capsys) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "caffe", _fake_caffe(calls))
    monkeypatch.setenv("DEEPLAB_CPU_ONLY", "1")
    for name in ("net.prototxt", "net.caffemodel"):
        (tmp_path / name).write_text("", encoding="utf-8")
    code = eb.main(["--prototxt", str(tmp_path / "net.prototxt"),
                    "--caffemodel", str(tmp_path / "net.caffemodel"),
                    "--input", "synthetic:4x5", "--out", str(tmp_path / "ref.h5"), "--gpu", "0"])
    assert code == 2
    assert "CPU_ONLY=1" in capsys.readouterr().err
    assert calls == []


def test_script_compiles_with_python3_py_compile(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "py_compile", str(SCRIPT)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_script_avoids_syntax_python2_lacks() -> None:
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    future = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
              and node.module == "__future__" for alias in node.names}
    assert {"print_function", "division"} <= future
    python3_only = (ast.JoinedStr, ast.AnnAssign, ast.Nonlocal, ast.YieldFrom, ast.NamedExpr,
                    ast.AsyncFunctionDef, ast.Await, ast.MatMult)
    for node in ast.walk(tree):
        where = getattr(node, "lineno", "?")
        assert not isinstance(node, python3_only), f"line {where}: {type(node).__name__}"
        if isinstance(node, ast.arg):
            assert node.annotation is None, f"line {where}: annotation"
        if isinstance(node, ast.FunctionDef):
            assert node.returns is None and not node.args.kwonlyargs, f"line {where}: {node.name}"
        if isinstance(node, ast.Raise):
            assert node.cause is None, f"line {where}: raise ... from"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
            assert node.args, f"line {where}: super() without arguments"


def _python2() -> str | None:
    """A working Python 2 interpreter: $PYTHON2, else python2/python2.7 on PATH, else pyenv's."""
    candidates = [os.environ.get("PYTHON2"), shutil.which("python2"), shutil.which("python2.7")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python2.7")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; sys.exit(sys.version_info[0] != 2)"],
                               capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def _python2_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no export_blobs.pyc beside the script
    if os.environ.get("PYTHON2PATH"):
        env["PYTHONPATH"] = os.environ["PYTHON2PATH"]
    return env


def test_script_compiles_under_python2() -> None:
    python2 = _python2()
    if python2 is None:
        pytest.skip("no Python 2 interpreter here")
    code = "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')"
    result = subprocess.run([python2, "-c", code, str(SCRIPT)], capture_output=True, text=True,
                            env=_python2_env())
    assert result.returncode == 0, result.stderr


PYTHON2_DRIVER = textwrap.dedent("""
    import sys
    from collections import OrderedDict
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import export_blobs as eb

    class Blob(object):
        def __init__(self, shape):
            self.data = np.zeros(shape, np.float32)
        def reshape(self, *shape):
            self.data = np.zeros(shape, np.float32)

    class Layer(object):
        type = "ReLU"

    class Net(object):
        inputs = ["data"]
        _layer_names = ["a/b", "relu"]
        layers = [Layer(), Layer()]
        def __init__(self):
            self.blobs = OrderedDict([("data", Blob((1, 3, 2, 2))), ("a/b", Blob((1, 3, 2, 2)))])
        def reshape(self):
            self.blobs["a/b"].reshape(*self.blobs["data"].data.shape)
        def forward(self):
            self.blobs["a/b"].data[...] = np.maximum(self.blobs["data"].data - 1, 0)

    net = Net()
    inputs = eb.load_inputs("synthetic:3x4", eb.declared_input_shapes(net), 0)
    inputs["data"] = inputs["data"] / 100
    eb.export(net, inputs, sys.argv[2], "python2 run", "name: 'py2'", None)
""")


def test_python2_run_writes_a_file_python3_reads(tmp_path: Path) -> None:
    python2 = _python2()
    if python2 is None:
        pytest.skip("no Python 2 interpreter here")
    env = _python2_env()
    if subprocess.run([python2, "-c", "import numpy, h5py"], env=env, capture_output=True).returncode:
        pytest.skip("the Python 2 interpreter has no numpy/h5py")
    out = tmp_path / "py2.h5"
    result = subprocess.run([python2, "-c", PYTHON2_DRIVER, str(DOCKER_DIR), str(out)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as handle:
        assert handle.attrs["format"] == "caffe-activations"
        assert handle.attrs["prototxt"] == "name: 'py2'"
        assert list(handle["blobs"].attrs["order"]) == ["a/b"]
        data = handle["inputs"]["data"][...]
        assert data.shape == (1, 3, 3, 4)
        np.testing.assert_allclose(handle["blobs"]["a%2Fb"][...], np.maximum(data - 1, 0))


FORWARD_CPU_TAIL = """\
template <typename Dtype>
void BatchNormLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
    const vector<Blob<Dtype>*>& top) {
  caffe_div(temp_.count(), top_data, temp_.cpu_data(), top_data);
  caffe_copy(x_norm_.count(), top_data,
      x_norm_.mutable_cpu_data());
}
"""
BACKWARD_CPU_HEAD = """\
template <typename Dtype>
void BatchNormLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
    const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom) {
    caffe_copy(x_norm_.count(), top[0]->cpu_diff(), x_norm_.mutable_cpu_diff());
}
"""


def _fork_tree(root: Path, batch_norm: str) -> Path:
    """The two fork files patch_fork_for_cpu.sh edits, reduced to the lines that matter."""
    (root / "src/caffe/layers").mkdir(parents=True)
    (root / "include/caffe/util").mkdir(parents=True)
    (root / "src/caffe/layers/batch_norm_layer.cpp").write_text(batch_norm)
    (root / "include/caffe/util/interp.hpp").write_text(
        "#ifndef CAFFE_UTIL_INTERP_H_\n#include <cublas_v2.h>\n#include \"caffe/proto/caffe.pb.h\"\n")
    return root


def _run_patch(root: Path) -> subprocess.CompletedProcess:
    if shutil.which("sh") is None or shutil.which("sed") is None:
        pytest.skip("needs sh and sed")
    return subprocess.run(["sh", str(PATCH_SCRIPT), str(root)], capture_output=True, text=True)


def test_cpu_patch_removes_only_the_forward_x_norm_copy(tmp_path: Path) -> None:
    root = _fork_tree(tmp_path, FORWARD_CPU_TAIL + BACKWARD_CPU_HEAD)
    result = _run_patch(root)
    assert result.returncode == 0, result.stderr
    patched = (root / "src/caffe/layers/batch_norm_layer.cpp").read_text()
    assert "x_norm_.mutable_cpu_data()" not in patched
    assert "caffe_div(temp_.count(), top_data, temp_.cpu_data(), top_data);\n}" in patched
    assert BACKWARD_CPU_HEAD in patched


def test_cpu_patch_guards_the_cublas_include(tmp_path: Path) -> None:
    root = _fork_tree(tmp_path, FORWARD_CPU_TAIL)
    assert _run_patch(root).returncode == 0
    header = (root / "include/caffe/util/interp.hpp").read_text()
    assert "#ifndef CPU_ONLY\n#include <cublas_v2.h>\n#endif\n" in header


def test_cpu_patch_stops_the_build_when_the_copy_is_not_found(tmp_path: Path) -> None:
    root = _fork_tree(tmp_path, BACKWARD_CPU_HEAD)
    result = _run_patch(root)
    assert result.returncode != 0
    assert "expected one" in result.stderr


def test_dockerfile_pins_the_fork_and_patches_only_cpu_builds() -> None:
    dockerfile = (DOCKER_DIR / "Dockerfile").read_text()
    assert f"ARG DEEPLAB_COMMIT={FORK_COMMIT}" in dockerfile
    assert 'if [ "$CPU_ONLY" = 1 ]; then sh /opt/caffe_docker/patch_fork_for_cpu.sh' in dockerfile
    config = (DOCKER_DIR / "Makefile.config").read_text()
    assert "USE_CUDNN := 0" in config
