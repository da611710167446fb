"""DeepLab-v2 ResNet net definitions (prototxt) for any ResNetConfig, laid out like the release's nets.

The definitions are built as NetParameter messages and printed with text_format, so the text always
parses. Layer names, order, typed params and `param { name: ... }` sharing follow the release's
prototxts (see tests/test_netspec.py for which reference file pairs with which kind); the data layers
and the tails (labels, ArgMax/MatWrite, CRF, losses) are left out: inputs are declared the old way
(`input:` + `input_shape`) because the deeplab-v2 fork has no `Input` layer type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format

from converter.caffe.schema import caffe_pb
from models.alignment import (
    DATA_RES05,
    DATA_RES075,
    POOL1,
    RES05_INTERP,
    RES075_INTERP,
    STAGE_DILATIONS,
    STAGE_STRIDES,
    STEM_CONV,
    TEST_ZOOM,
)
from converter.deeplab.names import caffe_block_name, tower_name
from models.deeplab import ASPP_DILATIONS, HEAD_WEIGHT_STD, ResNetConfig

# Tower suffixes in the order the release's multi-scale nets list them (1, 1/2, 3/4).
PROTOTXT_TOWER_ORDER = ("", "_res05", "_res075")
# The release's nets spell out zero Interp padding on the multi-scale resizes (not on fc1_interp).
_NO_PAD = {"pad_beg": 0, "pad_end": 0}


@dataclass(frozen=True)
class _KindDefaults:
    head_name: str
    num_classes: int
    multi_scale: bool


_KIND_DEFAULTS = {
    "msc_test": _KindDefaults("fc1_voc12", 21, True),
    "single_scale": _KindDefaults("fc1_voc12", 21, False),
    "init": _KindDefaults("fc1_coco", 91, False),
}
KINDS = tuple(_KIND_DEFAULTS)


def kind_defaults(kind: str) -> tuple[str, int]:
    """(head name, class count) a kind uses when the caller gives none: the init net has the COCO head."""
    d = _defaults(kind)
    return d.head_name, d.num_classes


def deeplab_net_param(
    kind: str,
    config: ResNetConfig,
    num_classes: int | None = None,
    input_size: tuple[int, int] = (321, 321),
    head_name: str | None = None,
) -> Any:
    """The DeepLab-v2 net of `kind` for `config` as a NetParameter message (no blobs)."""
    defaults = _defaults(kind)
    head = defaults.head_name if head_name is None else head_name
    classes = defaults.num_classes if num_classes is None else num_classes
    pb = caffe_pb()
    net = pb.NetParameter(name=f"deeplab_v2_{kind}")
    net.input.append("data")
    net.input_shape.add().dim.extend([1, 3, int(input_size[0]), int(input_size[1])])
    builder = _Builder(net, pb)
    suffixes = PROTOTXT_TOWER_ORDER if defaults.multi_scale else ("",)
    if defaults.multi_scale:
        builder.interp("data_res05", "data", **DATA_RES05, **_NO_PAD)
        builder.interp("data_res075", "data", **DATA_RES075, **_NO_PAD)
    for suffix in suffixes:
        features = builder.tower(config, suffix)
    for suffix in suffixes:
        builder.aspp(head, classes, features, suffix)
    if defaults.multi_scale:
        builder.interp(f"{head}_res05_interp", f"{head}_res05", **RES05_INTERP, **_NO_PAD)
        builder.interp(f"{head}_res075_interp", f"{head}_res075", **RES075_INTERP, **_NO_PAD)
        builder.eltwise("fc_fusion", [head, f"{head}_res075_interp", f"{head}_res05_interp"], pb.EltwiseParameter.MAX)
        builder.interp("fc1_interp", "fc_fusion", **TEST_ZOOM)
    else:
        builder.interp("fc1_interp", head, **TEST_ZOOM)
    return net


def deeplab_prototxt(
    kind: str,
    config: ResNetConfig,
    num_classes: int | None = None,
    input_size: tuple[int, int] = (321, 321),
    head_name: str | None = None,
) -> str:
    """The DeepLab-v2 net of `kind` ("msc_test", "single_scale", "init") for `config` as prototxt text.

    `num_classes`/`head_name` default per kind: 21 and "fc1_voc12", or 91 and "fc1_coco" for "init".
    """
    return text_format.MessageToString(deeplab_net_param(kind, config, num_classes, input_size, head_name))


def _defaults(kind: str) -> _KindDefaults:
    try:
        return _KIND_DEFAULTS[kind]
    except KeyError:
        raise ValueError(f"unknown DeepLab net kind {kind!r}; expected one of {', '.join(KINDS)}") from None


class _Builder:
    """Appends layers to a NetParameter; tower layers get the tower suffix, shared params do not."""

    def __init__(self, net: Any, pb: Any) -> None:
        self.net = net
        self.pb = pb

    def _layer(self, name: str, type_: str, bottoms: list[str], tops: list[str]) -> Any:
        layer = self.net.layer.add(name=name, type=type_)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        return layer

    def interp(self, name: str, bottom: str, **fields: int) -> None:
        layer = self._layer(name, "Interp", [bottom], [name])
        for key, value in fields.items():
            setattr(layer.interp_param, key, value)

    def eltwise(self, name: str, bottoms: list[str], operation: int | None = None) -> None:
        layer = self._layer(name, "Eltwise", bottoms, [name])
        if operation is not None:
            layer.eltwise_param.operation = operation

    def tower(self, config: ResNetConfig, sfx: str) -> str:
        """conv1, pool1 and res2..res5 of one tower reading data<sfx>; returns the last block's blob."""
        self.conv_unit("conv1", "bn_conv1", "scale_conv1", "data", "conv1", sfx, num_output=config.stem_width,
                       kernel=STEM_CONV["kernel"], pad=STEM_CONV["pad"], stride=STEM_CONV["stride"], dilation=1)
        self.relu("conv1_relu", "conv1", sfx)
        pool = self._layer("pool1" + sfx, "Pooling", ["conv1" + sfx], ["pool1" + sfx])
        p = pool.pooling_param
        p.kernel_size, p.stride, p.pad = POOL1["kernel"], POOL1["stride"], POOL1["pad"]
        p.pool = self.pb.PoolingParameter.MAX
        previous = "pool1"
        for stage, count in enumerate(config.blocks):
            for index in range(count):
                previous = self.bottleneck(
                    f"{stage + 2}{caffe_block_name(stage + 2, index)}",
                    previous,
                    sfx,
                    width=config.widths[stage],
                    stride=STAGE_STRIDES[stage] if index == 0 else 1,
                    dilation=STAGE_DILATIONS[stage],
                    projection=index == 0,
                )
        return previous

    def bottleneck(self, block: str, bottom: str, sfx: str, *, width: int, stride: int,
                   dilation: int, projection: bool) -> str:
        """res<block>: branch1 (projection, first block only) + branch2a/b/c, Eltwise sum, ReLU."""
        out = f"res{block}"
        shortcut = bottom
        if projection:
            shortcut = self.conv_unit(f"{out}_branch1", f"bn{block}_branch1", f"scale{block}_branch1", bottom,
                                      f"{out}_branch1", sfx, num_output=4 * width, kernel=1, pad=0,
                                      stride=stride, dilation=1)
        x = bottom
        for branch, kernel, stride_, pad, out_width in (
            ("2a", 1, stride, 0, width),
            ("2b", 3, 1, dilation, width),
            ("2c", 1, 1, 0, 4 * width),
        ):
            conv = f"{out}_branch{branch}"
            x = self.conv_unit(conv, f"bn{block}_branch{branch}", f"scale{block}_branch{branch}", x, conv, sfx,
                               num_output=out_width, kernel=kernel, pad=pad, stride=stride_,
                               dilation=dilation if kernel == 3 else 1)
            if branch != "2c":
                self.relu(f"{conv}_relu", conv, sfx)
        self.eltwise(out + sfx, [shortcut + sfx, x + sfx])
        self.relu(f"{out}_relu", out, sfx)
        return out

    def conv_unit(self, conv: str, bn: str, scale: str, bottom: str, blob: str, sfx: str, *,
                  num_output: int, kernel: int, pad: int, stride: int, dilation: int) -> str:
        """Convolution (no bias) + BatchNorm (global stats) + Scale (with bias), in place on `blob`."""
        top = blob + sfx
        layer = self._layer(conv + sfx, "Convolution", [bottom + sfx], [top])
        self.params(layer, f"{conv}_0", lr_mult=1, decay_mult=1)
        cp = layer.convolution_param
        cp.num_output = num_output
        cp.kernel_size.append(kernel)
        cp.pad.append(pad)
        cp.stride.append(stride)
        if dilation > 1:
            cp.dilation.append(dilation)
        cp.bias_term = False
        layer = self._layer(bn + sfx, "BatchNorm", [top], [top])
        layer.batch_norm_param.use_global_stats = True
        for i in range(3):
            self.params(layer, f"{bn}_{i}", lr_mult=0)
        layer = self._layer(scale + sfx, "Scale", [top], [top])
        layer.scale_param.bias_term = True
        for i in range(2):
            self.params(layer, f"{scale}_{i}", lr_mult=0)
        return blob

    def relu(self, name: str, blob: str, sfx: str) -> None:
        self._layer(name + sfx, "ReLU", [blob + sfx], [blob + sfx])

    def params(self, layer: Any, name: str, *, lr_mult: float, decay_mult: float | None = None) -> None:
        spec = layer.param.add(name=name, lr_mult=lr_mult)
        if decay_mult is not None:
            spec.decay_mult = decay_mult

    def aspp(self, head: str, num_classes: int, features: str, sfx: str) -> None:
        """<head>_c0..c3 (3x3, pad = dilation 6/12/18/24) on `features`, summed into <head>."""
        branches = []
        for i, dilation in enumerate(ASPP_DILATIONS):
            name = tower_name(f"{head}_c{i}", sfx, head)
            layer = self._layer(name, "Convolution", [features + sfx], [name])
            self.params(layer, f"{head}_c{i}_w", lr_mult=10, decay_mult=1)
            self.params(layer, f"{head}_c{i}_b", lr_mult=20, decay_mult=0)
            cp = layer.convolution_param
            cp.num_output = num_classes
            cp.kernel_size.append(3)
            cp.pad.append(dilation)
            cp.dilation.append(dilation)
            cp.weight_filler.type = "gaussian"
            cp.weight_filler.std = HEAD_WEIGHT_STD
            cp.bias_filler.type = "constant"
            cp.bias_filler.value = 0
            branches.append(name)
        self.eltwise(head + sfx, branches, self.pb.EltwiseParameter.SUM)
