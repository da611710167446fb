"""Shared by the bad-input tests: the fuzz seeds as a small valid release, and the one-line-error check."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Sequence

from google.protobuf import text_format

from converter.caffe.schema import caffe_pb
from fuzz.seeds import Seeds, make_seeds

_SEEDS: dict[str, Seeds] = {}


def seed_files(factory) -> Seeds:
    """The session's seed files (a small DeepLab-v2 release, HDF5 weights, a checkpoint, a reference)."""
    if "seeds" not in _SEEDS:
        _SEEDS["seeds"] = make_seeds(factory.mktemp("bad_input_seeds"))
    return _SEEDS["seeds"]


def run(main: Callable[[Sequence[str]], int], *argv: object) -> tuple[int, str, str]:
    """A command's exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, err: str, *, names: Path | str, layer: str | None = None) -> str:
    """Assert the README's promise: exit code 2, exactly one `error:` line, naming the file (and layer)."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(names) in lines[0], f"{names} not named in: {lines[0]}"
    if layer is not None:
        assert f"layer '{layer}'" in lines[0], f"layer {layer} not named in: {lines[0]}"
    return lines[0]


def edit_net_text(source: Path, target: Path, edit: Callable[[object], None]) -> Path:
    """A copy of a prototxt with `edit(NetParameter)` applied."""
    net = caffe_pb().NetParameter()
    text_format.Parse(source.read_text(), net)
    edit(net)
    target.write_text(text_format.MessageToString(net))
    return target


def edit_net_binary(source: Path, target: Path, edit: Callable[[object], None]) -> Path:
    """A copy of a binary caffemodel with `edit(NetParameter)` applied."""
    net = caffe_pb().NetParameter.FromString(source.read_bytes())
    edit(net)
    target.write_bytes(net.SerializeToString())
    return target


def layer(net: object, name: str) -> object:
    """The layer of a NetParameter called `name`."""
    return next(item for item in net.layer if item.name == name)
