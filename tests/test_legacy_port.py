"""The earlier PyTorch port's key layout (pytorch-deeplab-resnet MS_Deeplab): import and export."""

from __future__ import annotations

import pytest
import torch

from converter.errors import CaffeError
from converter.deeplab.legacy_port import from_legacy, to_legacy
from models.deeplab import DeepLabV2, ResNetConfig

BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _legacy_layout(config: ResNetConfig, num_classes: int, *, counters: bool) -> dict[str, torch.Tensor]:
    """A state dict spelled as the earlier port saved it, built from its documented module tree:
    MS_Deeplab.Scale = ResNet(conv1, bn1, layer1..4 of Bottleneck(conv1..3, bn1..3, downsample on block 0),
    layer5 = Classifier_Module(conv2d_list of four 3x3 convs with bias))."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def conv(key: str, out: int, inp: int, k: int) -> None:
        state[key] = torch.randn((out, inp, k, k), generator=generator)

    def bn(prefix: str, channels: int) -> None:
        for name in BN_BUFFERS:
            state[f"{prefix}.{name}"] = torch.rand(channels, generator=generator)
        if counters:  # saved by PyTorch >= 0.4.1
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    conv("Scale.conv1.weight", config.stem_width, 3, 7)
    bn("Scale.bn1", config.stem_width)
    inplanes = config.stem_width
    for layer, (count, width) in enumerate(zip(config.blocks, config.widths), start=1):
        for block in range(count):
            prefix = f"Scale.layer{layer}.{block}"
            conv(f"{prefix}.conv1.weight", width, inplanes, 1)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2.weight", width, width, 3)
            bn(f"{prefix}.bn2", width)
            conv(f"{prefix}.conv3.weight", 4 * width, width, 1)
            bn(f"{prefix}.bn3", 4 * width)
            if block == 0:
                conv(f"{prefix}.downsample.0.weight", 4 * width, inplanes, 1)
                bn(f"{prefix}.downsample.1", 4 * width)
            inplanes = 4 * width
    for branch in range(4):
        conv(f"Scale.layer5.conv2d_list.{branch}.weight", num_classes, inplanes, 3)
        state[f"Scale.layer5.conv2d_list.{branch}.bias"] = torch.randn(num_classes, generator=generator)
    return state


@pytest.mark.parametrize("counters", [False, True], ids=["saved-before-0.4.1", "with-num_batches_tracked"])
def test_legacy_checkpoint_loads_strictly_into_the_model(counters: bool) -> None:
    config = ResNetConfig.tiny()
    legacy = _legacy_layout(config, 21, counters=counters)
    ours = from_legacy(legacy)
    assert ours["backbone.layer3.0.downsample.1.running_var"] is legacy["Scale.layer3.0.downsample.1.running_var"]
    assert ours["aspp.branches.2.bias"] is legacy["Scale.layer5.conv2d_list.2.bias"]
    DeepLabV2(num_classes=21, config=config).load_state_dict(ours, strict=True)


def test_legacy_round_trip_is_identity_without_bn_counters() -> None:
    legacy = _legacy_layout(ResNetConfig.tiny(), 21, counters=True)
    back = to_legacy(from_legacy(legacy))
    expected = {key: value for key, value in legacy.items() if not key.endswith("num_batches_tracked")}
    assert back.keys() == expected.keys()
    assert all(back[key] is expected[key] for key in expected)


def test_export_to_legacy_spells_the_earlier_ports_keys() -> None:
    config = ResNetConfig.tiny()
    ours = DeepLabV2(num_classes=21, config=config).state_dict()
    legacy = to_legacy(ours)
    assert legacy.keys() == _legacy_layout(config, 21, counters=False).keys()


def test_legacy_unknown_key_is_named() -> None:
    legacy = _legacy_layout(ResNetConfig.tiny(), 21, counters=False)
    legacy["Scale.fc.weight"] = torch.zeros(1)
    with pytest.raises(CaffeError, match=r"Scale\.fc\.weight"):
        from_legacy(legacy)


def test_legacy_missing_key_is_named_in_legacy_spelling() -> None:
    legacy = _legacy_layout(ResNetConfig.tiny(), 21, counters=False)
    del legacy["Scale.layer2.1.bn2.running_var"]
    with pytest.raises(CaffeError, match=r"missing keys: Scale\.layer2\.1\.bn2\.running_var"):
        from_legacy(legacy)


def test_export_rejects_keys_outside_the_model_layout() -> None:
    ours = dict(DeepLabV2(num_classes=21, config=ResNetConfig.tiny()).state_dict())
    ours["backbone.layer1.0.bn1.num_batches_tracked"] = torch.tensor(3)
    with pytest.raises(CaffeError, match="num_batches_tracked"):
        to_legacy(ours)
