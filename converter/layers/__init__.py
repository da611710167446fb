"""The layer registry: any supported Caffe net -> a PyTorch module.

Public API (stable; other packages, e.g. converter.export, build on it):

- `build_net(net, *, phase="TEST", input_shapes=None) -> CaffeNet`: `net` is a
  `converter.caffe.netdesc.Net` (from `converter.caffe.load.load_net`); weights are loaded
  when the net carries blobs. Bad input raises `CaffeError` (one line, file and layer).
- `CaffeNet(nn.Module)`:
  - `forward(*inputs, **inputs) -> dict[str, Tensor]`: the output blobs by Caffe name
    (blobs no kept layer consumes); positional inputs follow `input_names`.
  - `run(inputs: Mapping[str, Tensor], keep=() | "all") -> dict[str, Tensor]`: outputs plus
    the blobs named in `keep`; `"all"` returns every blob (inputs too) with the value it has
    when the forward ends (in-place layers overwrite, as in Caffe), in first-produced order.
  - `run_layer(name, *bottoms) -> tuple[Tensor, ...]`: one layer on given bottoms (`run_key(key, ...)`
    for `LayerInfo.key`, which tells apart layers that repeat a name: Caffe allows that).
  - `input_names`, `output_names`, `graph` (a `Graph`: inputs with shapes, outputs, per-layer
    `LayerInfo` with bottoms/tops/shapes/converter/parameter count/shared params, `left_out`
    layers with reasons; `graph.to_json()` is what manifests record).
  - `layer_module(name)`, `caffe_blobs(name) -> list[Tensor]`: a layer's blobs in Caffe's
    order and shapes (a BatchNorm gives mean, variance, factor with the statistics already
    divided and factor 1).
- State-dict keys: `layers.<layer_key(name)>.<attribute>`; `layer_key` writes `%` as `%25`
  and `.` as `%2E` (other characters, `/` included, stay); `layer_name` inverts it. A
  parameter shared through `param { name }` appears once, under the first layer using it.
- `register(type_name, *aliases)`: decorator for a converter `(spec: LayerSpec) -> nn.Module`
  (see `converter.layers.registry`); `load_plugin(module_name)` imports a module of such
  converters; `supported_types()` lists the registered types; `SUPPORTED_TYPES` is the
  built-in list. Input and data layers (`INPUT_TYPES`) become inputs; losses, accuracy and
  writer layers are left out at test time.
- `ARCH` = "caffe_net": the manifest arch of a registry-built checkpoint folder.
"""

from __future__ import annotations

from converter.layers.data import INPUT_TYPES
from converter.layers.graph import ARCH, CaffeNet, Graph, LayerInfo, LeftOut, SharedParam, build_net, layer_key, layer_name
from converter.layers.registry import LayerSpec, load_plugin, register, registration, supported_types, unregister

SUPPORTED_TYPES: tuple[str, ...] = supported_types()

__all__ = [
    "ARCH",
    "INPUT_TYPES",
    "SUPPORTED_TYPES",
    "CaffeNet",
    "Graph",
    "LayerInfo",
    "LayerSpec",
    "LeftOut",
    "SharedParam",
    "build_net",
    "layer_key",
    "layer_name",
    "load_plugin",
    "register",
    "registration",
    "supported_types",
    "unregister",
]
