"""Caffe's message classes, built at run time from converter/caffe/caffe.proto.

No protoc and no generated `caffe_pb2`: generated modules are tied to the protobuf
release that produced them and break on newer runtimes. Instead a small parser turns
the proto2 subset caffe.proto uses (messages, nested messages and enums, optional /
required / repeated fields, `[default = ...]`, `[packed = true]`, comments) into a
`FileDescriptorProto`, which is added to a private descriptor pool (so a `caffe`
package loaded by another library cannot clash) and turned into classes by the
runtime's own message factory. Works on protobuf 3.20 through 7.x (docs/protobuf.md).
"""

from __future__ import annotations

import ast
import functools
import re
from importlib import resources
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

__all__ = ["caffe_pb", "messages_from_descriptor", "proto_to_descriptor"]

_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FIELD.TYPE_DOUBLE,
    "float": _FIELD.TYPE_FLOAT,
    "int32": _FIELD.TYPE_INT32,
    "int64": _FIELD.TYPE_INT64,
    "uint32": _FIELD.TYPE_UINT32,
    "uint64": _FIELD.TYPE_UINT64,
    "sint32": _FIELD.TYPE_SINT32,
    "sint64": _FIELD.TYPE_SINT64,
    "fixed32": _FIELD.TYPE_FIXED32,
    "fixed64": _FIELD.TYPE_FIXED64,
    "sfixed32": _FIELD.TYPE_SFIXED32,
    "sfixed64": _FIELD.TYPE_SFIXED64,
    "bool": _FIELD.TYPE_BOOL,
    "string": _FIELD.TYPE_STRING,
    "bytes": _FIELD.TYPE_BYTES,
}
_FLOATING = {_FIELD.TYPE_DOUBLE, _FIELD.TYPE_FLOAT}
_LABELS = {"optional": _FIELD.LABEL_OPTIONAL, "required": _FIELD.LABEL_REQUIRED, "repeated": _FIELD.LABEL_REPEATED}

_TOKEN = re.compile(
    r"""(?P<skip>\s+|//[^\n]*|/\*.*?\*/)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<symbol>[{}\[\]=;,])""",
    re.VERBOSE | re.DOTALL,
)


class _Tokens:
    """The token stream of a .proto file, with line numbers for error messages."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.items: list[tuple[str, str, int]] = []
        pos, line = 0, 1
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                raise ValueError(f"{filename}:{line}: unexpected character {text[pos]!r}")
            if match.lastgroup != "skip":
                self.items.append((match.lastgroup, match.group(), line))
            line += match.group().count("\n")
            pos = match.end()
        self.index = 0

    def error(self, what: str) -> ValueError:
        line = self.items[min(self.index, len(self.items) - 1)][2] if self.items else 1
        return ValueError(f"{self.filename}:{line}: {what}")

    def peek(self) -> str | None:
        return self.items[self.index][1] if self.index < len(self.items) else None

    def peek_kind(self) -> str | None:
        return self.items[self.index][0] if self.index < len(self.items) else None

    def take(self, kind: str | None = None, value: str | None = None) -> str:
        if self.index >= len(self.items):
            raise self.error("unexpected end of file")
        token_kind, token, _ = self.items[self.index]
        if (kind is not None and token_kind != kind) or (value is not None and token != value):
            raise self.error(f"expected {value or kind}, found {token!r}")
        self.index += 1
        return token


def proto_to_descriptor(text: str, filename: str = "caffe.proto") -> descriptor_pb2.FileDescriptorProto:
    """Parse proto2 source (the subset caffe.proto uses) into a FileDescriptorProto; ValueError names the line."""
    tokens = _Tokens(text, filename)
    file_proto = descriptor_pb2.FileDescriptorProto(name=filename, syntax="proto2")
    while tokens.peek() is not None:
        keyword = tokens.take("ident")
        if keyword == "syntax":
            tokens.take(value="=")
            if tokens.take("string")[1:-1] != "proto2":
                raise tokens.error("only proto2 is supported")
            tokens.take(value=";")
        elif keyword == "package":
            file_proto.package = tokens.take("ident")
            tokens.take(value=";")
        elif keyword == "message":
            _parse_message(tokens, file_proto.message_type.add())
        elif keyword == "enum":
            _parse_enum(tokens, file_proto.enum_type.add())
        else:
            raise tokens.error(f"unsupported top-level statement {keyword!r}")
    _resolve_types(file_proto, tokens)
    return file_proto


def _parse_message(tokens: _Tokens, message: descriptor_pb2.DescriptorProto) -> None:
    message.name = tokens.take("ident")
    tokens.take(value="{")
    while tokens.peek() != "}":
        keyword = tokens.take("ident")
        if keyword == "message":
            _parse_message(tokens, message.nested_type.add())
        elif keyword == "enum":
            _parse_enum(tokens, message.enum_type.add())
        elif keyword in _LABELS:
            _parse_field(tokens, message.field.add(), _LABELS[keyword])
        else:
            raise tokens.error(f"unsupported statement {keyword!r} in message {message.name}")
    tokens.take(value="}")


def _parse_enum(tokens: _Tokens, enum: descriptor_pb2.EnumDescriptorProto) -> None:
    enum.name = tokens.take("ident")
    tokens.take(value="{")
    while tokens.peek() != "}":
        value = enum.value.add(name=tokens.take("ident"))
        tokens.take(value="=")
        value.number = int(tokens.take("number"))
        tokens.take(value=";")
    tokens.take(value="}")


def _parse_field(tokens: _Tokens, field: descriptor_pb2.FieldDescriptorProto, label: int) -> None:
    field.label = label
    type_name = tokens.take("ident")
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type_name = type_name  # resolved to a full name once every type is known
    field.name = tokens.take("ident")
    tokens.take(value="=")
    field.number = int(tokens.take("number"))
    if tokens.peek() == "[":
        tokens.take(value="[")
        while True:
            option = tokens.take("ident")
            tokens.take(value="=")
            kind = tokens.peek_kind()
            value = tokens.take()
            if option == "default":
                field.default_value = _default_text(kind, value, field, tokens)
            elif option == "packed":
                field.options.packed = value == "true"
            else:
                raise tokens.error(f"unsupported field option {option!r}")
            if tokens.peek() != ",":
                break
            tokens.take(value=",")
        tokens.take(value="]")
    tokens.take(value=";")


def _default_text(kind: str, value: str, field: descriptor_pb2.FieldDescriptorProto, tokens: _Tokens) -> str:
    """A default as FieldDescriptorProto spells it: unquoted strings, canonical numbers, enum value names."""
    if kind == "string":
        return ast.literal_eval(value)
    if field.HasField("type") and field.type in _FLOATING:
        return repr(float(value))
    if kind == "number":
        if "." in value or "e" in value.lower():
            raise tokens.error(f"integer field {field.name} has default {value}")
        return str(int(value))
    return value  # true / false, or an enum value name (checked when types are resolved)


def _resolve_types(file_proto: descriptor_pb2.FileDescriptorProto, tokens: _Tokens) -> None:
    """Turn every relative type reference into a full name, by protobuf's innermost-scope-first rule."""
    prefix = f".{file_proto.package}" if file_proto.package else ""
    kinds: dict[str, tuple[str, Any]] = {}

    def collect(scope: str, messages: Any, enums: Any) -> None:
        for enum in enums:
            kinds[f"{scope}.{enum.name}"] = ("enum", enum)
        for message in messages:
            kinds[f"{scope}.{message.name}"] = ("message", message)
            collect(f"{scope}.{message.name}", message.nested_type, message.enum_type)

    collect(prefix, file_proto.message_type, file_proto.enum_type)
    for scope, (kind, message) in list(kinds.items()):
        if kind != "message":
            continue
        for field in message.field:
            if not field.type_name:
                continue
            full = _lookup(field.type_name, scope, kinds)
            if full is None:
                raise ValueError(f"{tokens.filename}: {scope[1:]}.{field.name}: unknown type {field.type_name}")
            field.type_name = full
            target_kind, target = kinds[full]
            field.type = _FIELD.TYPE_ENUM if target_kind == "enum" else _FIELD.TYPE_MESSAGE
            if field.HasField("default_value") and field.type == _FIELD.TYPE_ENUM:
                if field.default_value not in {value.name for value in target.value}:
                    raise ValueError(f"{tokens.filename}: {scope[1:]}.{field.name}: no enum value {field.default_value}")


def _lookup(name: str, scope: str, kinds: dict[str, tuple[str, Any]]) -> str | None:
    head, _, rest = name.partition(".")
    while True:
        candidate = f"{scope}.{head}"
        if candidate in kinds:
            full = f"{candidate}.{rest}" if rest else candidate
            return full if full in kinds else None
        if not scope:
            return None
        scope = scope.rpartition(".")[0]


def _message_class(desc: Any, factory: Any) -> type:
    """The runtime's class for `desc`: GetMessageClass (protobuf >= 4.22), else the older factory API."""
    get_class = getattr(message_factory, "GetMessageClass", None)
    cls = get_class(desc) if get_class is not None else factory.GetPrototype(desc)
    for nested in desc.nested_types:
        if not hasattr(cls, nested.name):
            setattr(cls, nested.name, _message_class(nested, factory))
    return cls


def messages_from_descriptor(file_proto: descriptor_pb2.FileDescriptorProto) -> SimpleNamespace:
    """Message classes, enum wrappers and top-level enum values, like a generated `_pb2` module."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file_proto.SerializeToString())
    file_desc = pool.FindFileByName(file_proto.name)
    factory = None if hasattr(message_factory, "GetMessageClass") else message_factory.MessageFactory(pool)
    namespace = SimpleNamespace(DESCRIPTOR=file_desc)
    for name, desc in file_desc.message_types_by_name.items():
        setattr(namespace, name, _message_class(desc, factory))
    for name, desc in file_desc.enum_types_by_name.items():
        setattr(namespace, name, EnumTypeWrapper(desc))
        for value in desc.values:
            setattr(namespace, value.name, value.number)
    return namespace


@functools.lru_cache(maxsize=None)
def caffe_pb() -> SimpleNamespace:
    """The Caffe schema as a namespace: `caffe_pb().NetParameter`, `.LayerParameter`, `.Phase`, `.TEST`, ...

    Built once per process from the caffe.proto shipped in this package. Nested enums and
    their values are class attributes (`caffe_pb().PoolingParameter.MAX`), as with protoc output.
    """
    text = resources.files("converter.caffe").joinpath("caffe.proto").read_text(encoding="utf-8")
    return messages_from_descriptor(proto_to_descriptor(text, "caffe.proto"))
