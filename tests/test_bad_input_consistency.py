"""Bad input, classes 1 and 2 of issue 6: inputs that contradict each other, and derived values out of range.

Each case: exit code 2, one line naming the file and the layer, nothing at the output folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bad_input_case import edit_net_binary, edit_net_text, layer, one_error_line, run, seed_files
from converter.checkpoint import read_checkpoint
from converter.cli import main
from converter.deeplab.legacy_port import to_legacy
from fuzz.seeds import CAFFEMODEL, CHECKPOINT_DIR, PROTOTXT, Seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return seed_files(tmp_path_factory)


def _convert_with_prototxt(seeds: Seeds, prototxt: Path, out: Path) -> tuple[int, str]:
    code, _, err = run(main, "convert", "-q", "--caffemodel", seeds.path(CAFFEMODEL), "--prototxt", prototxt,
                       "--out", out)
    return code, err


def _set_num_output(net) -> None:
    layer(net, "fc1_voc12_c0").convolution_param.num_output = 20


def _set_kernel_size(net) -> None:
    param = layer(net, "conv1").convolution_param
    del param.kernel_size[:]
    param.kernel_size.append(5)


@pytest.mark.parametrize("edit, name, weights, definition", [
    (_set_num_output, "fc1_voc12_c0", "(21, 32, 3, 3)", "(20, 32, 3, 3)"),
    (_set_kernel_size, "conv1", "(4, 3, 7, 7)", "(4, 3, 5, 5)"),
], ids=["num_output", "kernel_size"])
def test_prototxt_contradicting_the_weights_names_the_layer_and_both_shapes(
    seeds, tmp_path, edit, name: str, weights: str, definition: str
) -> None:
    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert_with_prototxt(seeds, prototxt, tmp_path / "out")
    line = one_error_line(code, err, names=prototxt, layer=name)
    assert weights in line and definition in line and str(seeds.path(CAFFEMODEL)) in line
    assert not (tmp_path / "out").exists()


def test_dangling_bottom_is_bad_input_naming_the_layer(seeds, tmp_path) -> None:
    def edit(net) -> None:
        layer(net, "res2a_branch2a").bottom[0] = "nowhere"

    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert_with_prototxt(seeds, prototxt, tmp_path / "out")
    assert "'nowhere'" in one_error_line(code, err, names=prototxt, layer="res2a_branch2a")
    assert not (tmp_path / "out").exists()


def test_extra_layer_with_parameters_is_bad_input_naming_the_layer(seeds, tmp_path) -> None:
    def edit(net) -> None:
        extra = net.layer.add()
        extra.CopyFrom(layer(net, "fc1_voc12_c0"))
        extra.name, extra.top[0] = "fc_extra", "fc_extra"

    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert_with_prototxt(seeds, prototxt, tmp_path / "out")
    one_error_line(code, err, names=prototxt, layer="fc_extra")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["nan", "inf", "shape", "integer"])
def test_import_legacy_rejects_nan_inf_wrong_shape_and_integer_weights(seeds, tmp_path, damage: str) -> None:
    state_dict, _ = read_checkpoint(seeds.path(CHECKPOINT_DIR))
    legacy = to_legacy(state_dict)
    key = next(k for k in legacy if k.endswith("conv1.weight"))
    value = legacy[key].clone()
    if damage == "nan":
        value.view(-1)[0] = math.nan
    elif damage == "inf":
        value.view(-1)[-1] = math.inf
    elif damage == "shape":
        value = value[:, :, :-1]
    else:
        value = value.to(torch.int32)
    legacy[key] = value
    source = tmp_path / "legacy.pth"
    torch.save(legacy, source)
    code, _, err = run(main, "import-legacy", "--from-legacy", source, "--out", tmp_path / "out")
    assert "conv1.weight" in one_error_line(code, err, names=source)
    assert not (tmp_path / "out").exists()


def test_bn_moving_average_factor_that_overflows_the_statistics_is_bad_input(seeds, tmp_path) -> None:
    def edit(net) -> None:
        for item in net.layer:
            if item.name.startswith("bn_conv1"):  # the layer and its tower copies stay identical
                del item.blobs[2].data[:]
                item.blobs[2].data.append(1e-45)

    caffemodel = edit_net_binary(seeds.path(CAFFEMODEL), tmp_path / "m.caffemodel", edit)
    code, _, err = run(main, "convert", "-q", "--caffemodel", caffemodel, "--out", tmp_path / "out")
    assert "factor" in one_error_line(code, err, names=caffemodel, layer="bn_conv1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("eps", [math.inf, 0.0, -1e-5, math.nan])
def test_bn_eps_that_is_not_finite_and_positive_is_bad_input(seeds, tmp_path, eps: float) -> None:
    def edit(net) -> None:
        for item in net.layer:
            if item.type == "BatchNorm":
                item.batch_norm_param.eps = eps

    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert_with_prototxt(seeds, prototxt, tmp_path / "out")
    assert "eps" in one_error_line(code, err, names=prototxt, layer="bn_conv1")
    assert not (tmp_path / "out").exists()
