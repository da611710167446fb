"""`python -m converter build` and `python -m converter inspect`: any supported Caffe net through the layer registry.

- build: prototxt + caffemodel -> a checkpoint folder like `convert` writes (model.safetensors,
  model.pth, manifest.json with the net text and a description of the graph); `load_model`
  rebuilds the module from it (arch "caffe_net").
- inspect: the per-layer table (shapes, parameter counts, Caffe-specific notes) without running.

Both take `--define NAME=VALUE` (fills `${NAME}` placeholders), `--input-shape NAME=N,C,H,W`
(inputs the net gives no shape) and `--plugin MODULE` (imports a module registering converters).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from converter.caffe.load import load_net
from converter.caffe.prototxt import substitute_defines
from converter.checkpoint import file_record, new_manifest, write_checkpoint
from converter.errors import CaffeError
from converter.layers import ARCH, CaffeNet, build_net, load_plugin
from converter.layers.data import PHASES
from converter.layers.inspect import format_table, inspect_rows

MAX_INPUT_DIM = 1 << 20


def name_value_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """NAME=VALUE arguments as a dict; a malformed or repeated one is a CaffeError naming the option."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise CaffeError(f"{option} {value!r}: expected NAME=VALUE")
        if name in pairs:
            raise CaffeError(f"{option} {name} given twice")
        pairs[name] = rest
    return pairs


def input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """--input-shape NAME=N,C,H,W arguments as shapes (positive dims)."""
    shapes = {}
    for name, text in name_value_pairs(values, "--input-shape").items():
        try:
            dims = tuple(int(d) for d in text.split(","))
        except ValueError:
            raise CaffeError(f"--input-shape {name}={text}: dims must be whole numbers separated by commas") from None
        if not dims or not all(0 < d <= MAX_INPUT_DIM for d in dims):
            raise CaffeError(f"--input-shape {name}={text}: every dim must be from 1 to {MAX_INPUT_DIM}")
        shapes[name] = dims
    return shapes


def _require_file(path: str | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CaffeError(f"{option}: " + ("no such file" if not p.exists() else "not a file"), path=p)
    return p


def _built(args: argparse.Namespace) -> tuple[Any, CaffeNet, dict[str, Any]]:
    """(net description, built module, options as recorded) from the common arguments."""
    for module in args.plugin or []:
        load_plugin(module)
    defines = name_value_pairs(args.define, "--define")
    shapes = input_shapes(args.input_shape)
    prototxt = _require_file(args.prototxt, "--prototxt")
    caffemodel = _require_file(args.caffemodel, "--caffemodel")
    net = load_net(caffemodel, prototxt, defines=defines)
    built = build_net(net, phase=args.phase, input_shapes=shapes)
    options = {"defines": defines, "plugins": list(args.plugin or []), "phase": args.phase,
               "input_shapes": {name: list(shape) for name, shape in built.graph.inputs.items()}}
    return net, built, options


def run_build(args: argparse.Namespace) -> None:
    """prototxt + caffemodel -> checkpoint folder (arch caffe_net)."""
    started = time.perf_counter()
    if not args.out:
        raise CaffeError("--out is an empty string; give the output folder")
    net, built, options = _built(args)
    prototxt_text = _definition_text(Path(args.prototxt), options["defines"])
    graph = built.graph
    manifest = new_manifest(
        inputs={"caffemodel": file_record(args.caffemodel), "prototxt": file_record(args.prototxt)},
        prototxt_text=prototxt_text,
        model={"arch": ARCH, **options, "graph": graph.to_json()},
        surgery=None,
        coverage={
            "layers_run": len(graph.layers),
            "layers_left_out": len(graph.left_out),
            "weights_layers_ignored": list(net.ignored_layers),
            "parameters": sum(info.parameters for info in graph.layers),
            "shared_blobs": sum(len(info.shared) for info in graph.layers),
        },
    )
    paths = write_checkpoint(args.out, built.state_dict(), manifest)
    print(f"built {net.name or args.prototxt}: {len(graph.layers)} layers run, {len(graph.left_out)} left out"
          + (f" ({', '.join(f'{e.name} ({e.type})' for e in graph.left_out[:6])})" if graph.left_out else ""))
    print(f"inputs {_shapes(graph.inputs)}; outputs {_shapes({n: graph.blob_shapes[n] for n in graph.outputs})}")
    print(f"parameters {manifest['coverage']['parameters']:,}, shared blobs tied {manifest['coverage']['shared_blobs']}")
    for path in (paths.pth, paths.safetensors, paths.manifest):
        print(f"  wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"done in {time.perf_counter() - started:.1f} s")


def _definition_text(prototxt: Path, defines: dict[str, str]) -> str:
    """The net text as built: the prototxt with its placeholders filled (a reload needs no --define)."""
    return substitute_defines(prototxt.read_text(encoding="utf-8"), defines, prototxt)


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


def run_inspect(args: argparse.Namespace) -> None:
    """Print the per-layer table."""
    net, built, _ = _built(args)
    print(format_table(inspect_rows(built, net)))
    graph = built.graph
    print(f"{len(graph.layers)} layers run, {len(graph.left_out)} left out; "
          f"{sum(info.parameters for info in graph.layers):,} parameters; outputs {', '.join(graph.outputs)}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--define", action="append", metavar="NAME=VALUE", help="fill ${NAME} in the prototxt")
    parser.add_argument("--input-shape", action="append", metavar="NAME=N,C,H,W", help="shape of an input the net leaves open")
    parser.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE to register custom layer converters")
    parser.add_argument("--phase", choices=PHASES, default="TEST", help="net phase to build (default TEST)")


def add_commands(commands: Any) -> None:
    """Register `build` and `inspect` on the converter CLI's subparsers."""
    build = commands.add_parser("build", help="any supported Caffe net (prototxt + caffemodel) -> checkpoint folder")
    build.add_argument("--prototxt", required=True, help="net definition")
    build.add_argument("--caffemodel", required=True, help="weights: binary .caffemodel or Caffe HDF5")
    build.add_argument("--out", required=True, help="output folder for model.pth, model.safetensors, manifest.json")
    _common(build)
    build.set_defaults(run=run_build)

    inspect = commands.add_parser("inspect", help="per-layer table of what the registry builds from a net")
    inspect.add_argument("prototxt", help="net definition")
    inspect.add_argument("--caffemodel", help="weights (adds BatchNorm factors, checks blob shapes)")
    _common(inspect)
    inspect.set_defaults(run=run_inspect)
