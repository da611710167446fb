"""Caffe's text format: .prototxt nets into the read-only `Net` (V1 text upgraded).

Syntax errors name the file and line. Fields the schema does not know are tolerated, logged and
listed in `Net.unknown_fields` (text_format skips them without saying which, so a small
tokenizer finds them with their lines).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from google.protobuf import text_format

from converter.caffe import wire
from converter.caffe.files import PathLike, input_file
from converter.caffe.netdesc import Net, assemble_net
from converter.caffe.schema import caffe_pb
from converter.caffe.upgrade import upgrade_v1_layer
from converter.errors import CaffeError

log = logging.getLogger(__name__)


def parse_prototxt_text(text: str, path: PathLike = "<text>") -> Any:
    """Parse prototxt text into a NetParameter; CaffeError "<path>: line N: ..." on a syntax error.

    Unknown fields are skipped (and logged); `read_prototxt` also lists them in the Net.
    """
    param, unknown = _parse_text(text, path)
    for entry in unknown:
        log.warning("%s: %s", path, entry)
    return param


PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # `${NAME}` in DeepLab's prototxt templates


def substitute_defines(text: str, defines: Mapping[str, str], path: PathLike = "<text>") -> str:
    """`text` with each `${NAME}` replaced by `defines[NAME]`; a NAME the text never uses is a CaffeError
    (a misspelt --define would otherwise pass silently). Undefined placeholders stay as they are."""
    used = {match.group(1) for match in PLACEHOLDER.finditer(text)}
    unused = sorted(set(defines) - used)
    if unused:
        raise CaffeError(f"--define {', '.join(unused)}: no such ${{...}} placeholder in the file", path=path)
    return PLACEHOLDER.sub(lambda m: str(defines.get(m.group(1), m.group(0))), text)


def read_prototxt(path: PathLike, defines: Mapping[str, str] | None = None) -> Net:
    """The net defined by a .prototxt file (V1 text upgraded); its layers have no blobs unless the text holds some.

    `defines` fills `${NAME}` placeholders first (`substitute_defines`).
    """
    p = input_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaffeError(f"not a text prototxt (not UTF-8 at byte {exc.start})", path=p) from None
    return prototxt_net(text if defines is None else substitute_defines(text, defines, p), p)


def prototxt_net(text: str, path: PathLike = "<text>") -> Net:
    """The net defined by prototxt `text` (as `read_prototxt` reads a file); `path` names it in errors."""
    p = Path(path)
    try:
        param, unknown = _parse_text(text, p)
    except CaffeError as error:
        undefined = sorted({match.group(1) for match in PLACEHOLDER.finditer(text)})
        if not undefined:
            raise
        raise CaffeError(f"{error.message} (placeholders {', '.join(undefined)} are undefined: give --define NAME=VALUE)",
                         path=p) from None
    if len(param.layer) and len(param.layers):
        raise CaffeError("mixes current `layer` and V1 `layers` definitions", path=p)
    if not len(param.layer) and not len(param.layers):
        raise CaffeError("defines no layers: not a net prototxt (a solver?)", path=p)
    layers: list[tuple[Any, tuple[np.ndarray, ...]]] = []
    for version, layer in [(2, layer) for layer in param.layer] + [(1, layer) for layer in param.layers]:
        blobs = tuple(_decode_text_blob(blob, p, layer.name, i) for i, blob in enumerate(layer.blobs))
        layer.ClearField("blobs")
        layers.append((layer if version == 2 else upgrade_v1_layer(layer, p), blobs))
    return assemble_net(param, layers, p, unknown)


def _decode_text_blob(blob: Any, path: Path, layer: str, index: int) -> np.ndarray:
    """A blob written inline in text goes through the same decoder as binary ones (one shape rule)."""
    data = blob.SerializeToString()
    return wire.decode_blob(memoryview(data), data, 0, len(data), path=path, layer=layer, index=index).copy()


def _parse_text(text: str, path: PathLike) -> tuple[Any, list[str]]:
    """Strict parse; when only unknown fields stop it, a tolerant parse plus the list of what was skipped.

    The one guard where prototxt text enters: protobuf's text parser recurses once per nested
    message, so a text nesting hundreds of levels deep (no real net does) is refused as bad input.
    """
    try:
        return _parse_text_unguarded(text, path)
    except RecursionError:
        raise CaffeError("messages nest too deeply (hundreds of levels): not a net definition", path=path) from None


def _parse_text_unguarded(text: str, path: PathLike) -> tuple[Any, list[str]]:
    pb = caffe_pb()
    param = pb.NetParameter()
    try:
        text_format.Parse(text, param)
        return param, []
    except text_format.ParseError as strict_error:
        param = pb.NetParameter()
        try:
            text_format.Parse(text, param, allow_unknown_field=True)
        except text_format.ParseError:
            raise _syntax_error(strict_error, path) from None
    walker = _TextFieldWalker(text)
    walker.message(0, param.DESCRIPTOR, "", None)
    unknown = []
    for owner, name, line in walker.found:
        where = "net" if owner is None else f"layer '{getattr(param, owner[0])[owner[1]].name}'"
        unknown.append(f"{where}: unknown field {name} (line {line})")
    return param, unknown


def _syntax_error(error: text_format.ParseError, path: PathLike) -> CaffeError:
    message = re.sub(r"^\d+(:\d+)? : ", "", str(error))
    line = error.GetLine()
    return CaffeError(message if line is None else f"line {line}: {message}", path=path)


_TEXT_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<symbol>[{}\[\]<>:;,])
      | (?P<word>[^\s{}\[\]<>:;,"'\#]+)""",
    re.VERBOSE,
)


class _TextFieldWalker:
    """Finds the field names a text-format NetParameter uses that the schema lacks, with their lines.

    Runs only after text_format accepted the text with allow_unknown_field=True (so the text is
    well formed); text_format itself skips unknown fields without saying which.
    """

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        line = 1
        for match in _TEXT_TOKEN.finditer(text):
            if match.lastgroup != "skip":
                self.tokens.append((match.lastgroup, match.group(), line))
            line += match.group().count("\n")
        self.found: list[tuple[tuple[str, int] | None, str, int]] = []
        self.layer_counts = {"layer": 0, "layers": 0}

    def message(self, pos: int, descriptor: Any, prefix: str, owner: tuple[str, int] | None) -> int:
        """Walk fields from `pos` to the closing brace; returns the position after it."""
        while pos < len(self.tokens):
            _, token, line = self.tokens[pos]
            if token in ("}", ">"):
                return pos + 1
            pos += 1
            if token in (",", ";"):
                continue
            field = None if descriptor is None else descriptor.fields_by_name.get(token)
            if descriptor is not None and field is None:
                self.found.append((owner, prefix + token, line))
            if pos < len(self.tokens) and self.tokens[pos][1] == ":":
                pos += 1
            is_layer = owner is None and field is not None and field.name in self.layer_counts
            sub = None if field is None else field.message_type
            pos = self.value(pos, sub, f"{prefix}{token}.", owner, field.name if is_layer else None)
        return pos

    def value(self, pos: int, descriptor: Any, prefix: str, owner: Any, layer_field: str | None) -> int:
        _, token, _ = self.tokens[pos]
        if token in ("{", "<"):
            if layer_field is not None:
                owner, prefix = (layer_field, self.layer_counts[layer_field]), ""
                self.layer_counts[layer_field] += 1
            return self.message(pos + 1, descriptor, prefix, owner)
        if token == "[":
            pos += 1
            while pos < len(self.tokens) and self.tokens[pos][1] != "]":
                pos = pos + 1 if self.tokens[pos][1] == "," else self.value(pos, descriptor, prefix, owner, layer_field)
            return pos + 1
        pos += 1
        while pos < len(self.tokens) and self.tokens[pos][0] == "string" and self.tokens[pos - 1][0] == "string":
            pos += 1  # adjacent string literals concatenate
        return pos
