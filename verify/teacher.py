"""Teacher-forced steps: a PyTorch module fed the reference's own input blobs, to pin a divergence.

Each Caffe blob of the DeepLab net gets recipes, finest first: a residual block's branch
blobs from the block input (branch1, branch2a) or the previous branch blob (2b, 2c), its
output from branch2c and the shortcut (the Eltwise SUM + ReLU); failing those, the whole
block from the previous block's output. The first recipe whose inputs the reference holds
is used, so one step spans one layer group when the reference holds every top and one block
when it holds block outputs only; blobs whose inputs are absent get no forced step. The
full tower is forced throughout; the towers that share its weights get their stem, first
block and head, which is where their different input sizes matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn

from converter.deeplab.names import MSC_TOWER_SUFFIXES, caffe_blocks, head_layer_names, tower_name
from models.deeplab import ResNetConfig
from verify.capture import BlobMap


@dataclass(frozen=True)
class ForcedStep:
    """`output` = `run(*inputs)`, with every input taken from the reference; `what` names the modules."""

    output: str
    inputs: tuple[str, ...]
    run: Callable[..., torch.Tensor]
    what: str


@dataclass(frozen=True)
class _Recipe:
    inputs: tuple[str, ...]
    run: Callable[..., torch.Tensor]
    what: str


def forced_steps(model: nn.Module, config: ResNetConfig, blobs: BlobMap, available: Collection[str]) -> list[ForcedStep]:
    """The teacher-forced steps for every mapped blob whose inputs are `available` (reference blobs and inputs)."""
    recipes: dict[str, list[_Recipe]] = {}
    towers = MSC_TOWER_SUFFIXES if blobs.multi_scale else ("",)
    for tower in towers:
        _tower_recipes(model, config, blobs.head_name, tower, recipes, full=tower == "")
    if blobs.multi_scale:
        _msc_recipes(model, blobs.head_name, recipes)
    for name, tail in blobs.tails.items():
        recipes[name] = [_Recipe((tail.bottom,), tail.apply, f"Interp {tail.describe()}")]
    steps = []
    for output, options in recipes.items():
        if output not in blobs:
            continue
        chosen = next((r for r in options if all(i in available for i in r.inputs)), None)
        if chosen is not None:
            steps.append(ForcedStep(output, chosen.inputs, chosen.run, chosen.what))
    return steps


def _tower_recipes(
    model: nn.Module, config: ResNetConfig, head: str, tower: str, recipes: dict[str, list[_Recipe]], *, full: bool
) -> None:
    module = model.get_submodule
    stem_conv, stem_bn, stem_relu = module("backbone.conv1"), module("backbone.bn1"), module("backbone.relu")
    recipes[f"conv1{tower}"] = [  # a tower's input: data, data_res075, data_res05
        _Recipe((f"data{tower}",), lambda x: stem_relu(stem_bn(stem_conv(x))), "backbone.conv1+bn1+relu")
    ]
    recipes[f"pool1{tower}"] = [_Recipe((f"conv1{tower}",), module("backbone.maxpool"), "backbone.maxpool")]
    previous = f"pool1{tower}"
    blocks = caffe_blocks(config)
    for path, block_id in blocks if full else blocks[:1]:
        _block_recipes(module(path), path, f"res{block_id}", tower, previous, recipes)
        previous = f"res{block_id}{tower}"
    last = f"res{blocks[-1][1]}{tower}"
    aspp = module("aspp")
    branches = [tower_name(layer, tower, head) for layer in head_layer_names(head)]
    for k, name in enumerate(branches):
        recipes[name] = [_Recipe((last,), aspp.branches[k], f"aspp.branches.{k}")]
    recipes[f"{head}{tower}"] = [
        _Recipe(tuple(branches), aspp.sum, "Eltwise SUM of the ASPP branches (aspp.sum)"),
        _Recipe((last,), aspp, "aspp"),
    ]


def _block_recipes(
    block: nn.Module, path: str, caffe: str, tower: str, block_input: str, recipes: dict[str, list[_Recipe]]
) -> None:
    name = {part: f"{caffe}_{part}{tower}" for part in ("branch1", "branch2a", "branch2b", "branch2c")}
    shortcut = block_input
    if block.downsample is not None:
        recipes[name["branch1"]] = [_Recipe((block_input,), block.downsample, f"{path}.downsample")]
        shortcut = name["branch1"]
    recipes[name["branch2a"]] = [
        _Recipe((block_input,), lambda x: block.relu1(block.bn1(block.conv1(x))), f"{path}.conv1+bn1+relu1")
    ]
    recipes[name["branch2b"]] = [
        _Recipe((name["branch2a"],), lambda x: block.relu2(block.bn2(block.conv2(x))), f"{path}.conv2+bn2+relu2")
    ]
    recipes[name["branch2c"]] = [_Recipe((name["branch2b"],), lambda x: block.bn3(block.conv3(x)), f"{path}.conv3+bn3")]
    recipes[f"{caffe}{tower}"] = [
        _Recipe((name["branch2c"], shortcut), lambda c, s: block.relu_out(c + s), f"{path} Eltwise SUM + relu_out"),
        _Recipe((block_input,), block, path),
    ]


def _msc_recipes(model: nn.Module, head: str, recipes: dict[str, list[_Recipe]]) -> None:
    for name in ("data_res075", "data_res05"):
        recipes[name] = [_Recipe(("data",), model.get_submodule(name), name)]
    for tower, module in (("_res075", "fc1_voc12_res075_interp"), ("_res05", "fc1_voc12_res05_interp")):
        recipes[f"{head}{tower}_interp"] = [_Recipe((f"{head}{tower}",), model.get_submodule(module), module)]
    fused = (head, f"{head}_res075_interp", f"{head}_res05_interp")
    recipes["fc_fusion"] = [_Recipe(fused, model.get_submodule("fc_fusion"), "fc_fusion (Eltwise MAX)")]
