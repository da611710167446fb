"""Each known trap of porting DeepLab-v2 from Caffe, pinned by a named test that fails if it returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.alignment import msc_branch_sizes
from models.caffe_layers import CaffeMaxPool2d, EltwiseMax, EltwiseSum, caffe_pool_output_size
from converter.deeplab.names import caffe_msc_blob_taps
from models.deeplab import DeepLabV2, DeepLabV2MSC, ResNetConfig
from models.interp import CaffeInterp, caffe_interp, caffe_interp_size

TINY = ResNetConfig.tiny()


def caffe_max_pool_reference(x: np.ndarray, kernel: tuple, stride: tuple, pad: tuple) -> np.ndarray:
    """Caffe's PoolingLayer MAX forward, written from its definition: ceil-rounded output size,
    last window dropped if it starts in the padding, each window clipped to the image."""
    height, width = x.shape[-2:]
    out_h = caffe_pool_output_size(height, kernel[0], stride[0], pad[0])
    out_w = caffe_pool_output_size(width, kernel[1], stride[1], pad[1])
    out = np.empty(x.shape[:-2] + (out_h, out_w), x.dtype)
    for i in range(out_h):
        top = i * stride[0] - pad[0]
        rows = slice(max(top, 0), min(top + kernel[0], height))
        for j in range(out_w):
            left = j * stride[1] - pad[1]
            cols = slice(max(left, 0), min(left + kernel[1], width))
            out[..., i, j] = x[..., rows, cols].max(axis=(-2, -1))
    return out


def test_caffe_pool_reference_matches_real_caffe(shared_reference):
    """The reference above reproduces real Caffe (OpenCV's test case: 3x5 kernel, stride 2x1, pad 2x1, 75 -> 39)."""
    folder = shared_reference / "caffe_layers_opencv"
    out = caffe_max_pool_reference(np.load(folder / "blob.npy"), (3, 5), (2, 1), (2, 1))
    expected = np.load(folder / "layer_pooling_max.npy")
    assert out.shape == expected.shape
    assert np.array_equal(out, expected)


def test_pool_ceil_rounding_matches_caffe():
    floor_sizes = {n: (n + 2 - 3) // 2 + 1 for n in range(1, 40)}
    differ = [n for n in floor_sizes if caffe_pool_output_size(n, 3, 2, 1) != floor_sizes[n]]
    assert {8, 10, 14} <= set(differ)  # pool1 on even sizes: ceil gives one more output than floor
    assert caffe_pool_output_size(8, 3, 2, 1) == 5 and caffe_pool_output_size(9, 3, 2, 1) == 5
    # Caffe's clip: 5 with kernel 2, stride 2, pad 1 rounds up to 4 windows, the last starting
    # in the padding (3*2 >= 5+1), so it is dropped (pool1's geometry never triggers this).
    assert caffe_pool_output_size(5, 2, 2, 1) == 3 and caffe_pool_output_size(6, 2, 2, 1) == 4
    generator = torch.Generator().manual_seed(0)
    for kernel, stride, pad in [(3, 2, 1), (2, 2, 1), (3, 3, 1), (5, 3, 2)]:
        pool = CaffeMaxPool2d(kernel, stride, pad)
        for height, width in [(8, 10), (14, 9), (5, 7), (2, 3), (1, 1), (7, 16)]:
            x = torch.randn(2, 3, height, width, generator=generator)
            expected = caffe_max_pool_reference(x.numpy(), (kernel,) * 2, (stride,) * 2, (pad,) * 2)
            out = pool(x).numpy()
            assert out.shape == expected.shape, (kernel, stride, pad, height, width)
            assert np.array_equal(out, expected), (kernel, stride, pad, height, width)
    # In the model: image 15 -> conv1 8 -> pool1 5 (floor rounding would give 4).
    model = DeepLabV2(21, TINY).eval()
    with torch.no_grad():
        pool1 = model.backbone.maxpool(model.backbone.relu(model.backbone.bn1(model.backbone.conv1(torch.zeros(1, 3, 15, 21)))))
    assert pool1.shape[-2:] == (5, 6)


@pytest.mark.parametrize(
    "size, params, expected",
    [
        ((513, 321), {"shrink_factor": 2}, (257, 161)),  # (H-1)//s + 1
        ((500, 375), {"shrink_factor": 8}, (63, 47)),
        ((513, 321), {"shrink_factor": 4, "zoom_factor": 3}, (385, 241)),  # shrink, then zoom
        ((49, 31), {"zoom_factor": 4, "shrink_factor": 3}, (65, 41)),
        ((500, 375), {"shrink_factor": 4, "zoom_factor": 3}, (373, 280)),  # 125 -> 373, 94 -> 280
        ((33, 21), {"zoom_factor": 2}, (65, 41)),  # H + (H-1)(z-1)
        ((65, 48), {"zoom_factor": 8}, (513, 377)),
        ((4, 5), {"out_height": 9, "out_width": 8}, (9, 8)),  # explicit size
        ((4, 5), {"zoom_factor": 2, "shrink_factor": 2, "out_height": 9, "out_width": 8}, (9, 8)),  # explicit beats both
        ((4, 5), {"shrink_factor": 2, "out_height": 9, "out_width": 8}, (2, 3)),  # shrink only beats explicit
        ((10, 12), {"zoom_factor": 2, "pad_beg": -1, "pad_end": -1}, (15, 19)),  # H' = H + pads
        ((10, 12), {"shrink_factor": 3, "pad_end": -1}, (3, 4)),
        ((10, 12), {"out_height": 3, "out_width": 4, "pad_beg": -2}, (3, 4)),
    ],
)
def test_interp_sizes_follow_caffe_formulas(size, params, expected):
    assert caffe_interp_size(*size, **params) == expected
    layer_params = {("height" if k == "out_height" else "width" if k == "out_width" else k): v for k, v in params.items()}
    assert CaffeInterp(**layer_params)(torch.zeros(1, 1, *size)).shape[-2:] == expected


def test_interp_is_align_corners_bilinear():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    zoomed = CaffeInterp(zoom_factor=2)(x)
    expected = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]).reshape(1, 1, 3, 3)
    assert torch.equal(zoomed, expected)
    # Shrink 5 -> 3 samples positions 0, 2, 4 exactly; 4 -> 3 samples 0, 1.5, 3.
    row = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 1, 5)
    assert torch.equal(CaffeInterp(shrink_factor=2)(row), torch.tensor([0.0, 20.0, 40.0]).reshape(1, 1, 1, 3))
    assert torch.equal(caffe_interp(row[..., :4], 1, 3), torch.tensor([0.0, 15.0, 30.0]).reshape(1, 1, 1, 3))


def _randomize_frozen_bn(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        elif name.endswith("weight"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        else:
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def _reference_block(block: torch.nn.Module, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """A Caffe res4/res5 block from the prototxt: 1x1 stride 1, 3x3 pad = dilation, 1x1, + shortcut."""

    def bn(module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1)
        std = torch.sqrt(module.running_var + module.eps).view(view)
        return (t - module.running_mean.view(view)) / std * module.weight.view(view) + module.bias.view(view)

    out = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight)))
    out = F.relu(bn(block.bn2, F.conv2d(out, block.conv2.weight, padding=dilation, dilation=dilation)))
    out = bn(block.bn3, F.conv2d(out, block.conv3.weight))
    shortcut = x if block.downsample is None else bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight))
    return F.relu(out + shortcut)


def test_dilation_and_padding_of_res4_res5():
    model = DeepLabV2(21, TINY).eval()
    _randomize_frozen_bn(model, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer, dilation in ((model.backbone.layer3, 2), (model.backbone.layer4, 4)):
            for block in layer:
                x = torch.randn(1, block.conv1.in_channels, 11, 13, generator=generator)
                out = block(x)
                assert out.shape[-2:] == (11, 13)  # stride 1, size kept
                torch.testing.assert_close(out, _reference_block(block, x, dilation), rtol=1e-5, atol=1e-5)
        # Output stride 8 overall: 65 -> 9, 64 -> 9 (pool1 ceil), 57 -> 8.
        assert model(torch.zeros(1, 3, 65, 57)).shape[-2:] == (9, 8)


# Per input size and tower suffix: (data, conv1, pool1 = res2, score = res3 .. fc1), by hand
# from Caffe's formulas: conv floor((n+6-7)/2)+1, pool ceil((n-1)/2)+1, res3a stride 2.
CAFFE_TOWER_SIZES = {
    513: {"": (513, 257, 129, 65), "_res075": (385, 193, 97, 49), "_res05": (257, 129, 65, 33)},
    321: {"": (321, 161, 81, 41), "_res075": (241, 121, 61, 31), "_res05": (161, 81, 41, 21)},
}


def _expected_blob_size(blob: str, size: int) -> int:
    if blob in ("data_res075", "data_res05"):
        return CAFFE_TOWER_SIZES[size][blob[4:]][0]
    if blob.endswith("_interp") or blob == "fc_fusion":
        return CAFFE_TOWER_SIZES[size][""][3]
    suffix = next((s for s in ("_res075", "_res05") if s in blob), "")
    data, conv1, pool1, score = CAFFE_TOWER_SIZES[size][suffix]
    if blob.startswith("conv1"):
        return conv1
    if blob.startswith(("pool1", "res2")):
        return pool1
    return score


def test_msc_branch_sizes_match_caffe_for_321_and_513():
    for size in CAFFE_TOWER_SIZES:
        sizes = msc_branch_sizes(size)
        towers = CAFFE_TOWER_SIZES[size]
        assert (sizes.data_res075, sizes.data_res05) == (towers["_res075"][0], towers["_res05"][0])
        assert (sizes.full, sizes.res075, sizes.res05) == (towers[""][3], towers["_res075"][3], towers["_res05"][3])
        assert sizes.res075_interp == sizes.res05_interp == sizes.full
    # Every blob of the real model, rows at 513 and columns at 321 in one non-square run.
    model = DeepLabV2MSC(21, TINY, align="strict").eval()
    taps = caffe_msc_blob_taps(TINY)
    calls: dict[str, list[tuple[int, int]]] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda module, args, out, path=path: calls.setdefault(path, []).append(tuple(out.shape[-2:]))
        )
        for path in {path for path, _ in taps.values()}
    ]
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 513, 321))
    for handle in handles:
        handle.remove()
    for blob, (path, call) in taps.items():
        assert calls[path][call] == (_expected_blob_size(blob, 513), _expected_blob_size(blob, 321)), blob
    assert outputs.scale05.shape[-2:] == (33, 21)
    assert outputs.fused.shape[-2:] == outputs.scale075.shape[-2:] == outputs.full.shape[-2:] == (65, 41)


def test_fusion_is_elementwise_max():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).reshape(1, 1, 2, 2)
    b = torch.tensor([[0.0, 5.0], [-1.0, 0.5]]).reshape(1, 1, 2, 2)
    c = torch.tensor([[2.0, -3.0], [0.0, 0.25]]).reshape(1, 1, 2, 2)
    expected = torch.tensor([[2.0, 5.0], [3.0, 0.5]]).reshape(1, 1, 2, 2)
    assert torch.equal(EltwiseMax()(a, b, c), expected)
    with pytest.raises(ValueError, match="one shape"):
        EltwiseMax()(a, b[..., :1, :])  # Caffe does not broadcast
    model = DeepLabV2MSC(5, TINY).eval()
    _randomize_frozen_bn(model, seed=3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(4)))
    res05_interp = F.interpolate(out.scale05, size=out.full.shape[-2:], mode="bilinear", align_corners=True)
    stacked = torch.stack([out.full, out.scale075, res05_interp])
    assert torch.equal(out.fused, stacked.max(dim=0).values)
    winners = stacked.argmax(dim=0)
    assert all((winners == k).any() for k in range(3)), "every scale should win somewhere on random weights"


def test_eltwise_sum_adds_left_to_right_with_coefficients():
    # float32 addition is not associative: 1e8 + 1 - 1e8 is 0 left to right, 1 otherwise
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in (1e8, 1.0, -1e8))
    assert EltwiseSum()(a, b, c).item() == 0.0 and EltwiseSum()(a, c, b).item() == 1.0
    x, y = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(EltwiseSum([0.5, -1.0])(x, y), torch.full((2, 3), -1.5))
    with pytest.raises(ValueError, match="one shape"):
        EltwiseSum()(x, y[:, :1])  # Caffe does not broadcast
    with pytest.raises(ValueError, match="2 coefficients for 3 inputs"):
        EltwiseSum([1.0, 1.0])(x, x, x)

