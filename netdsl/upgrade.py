"""Old Caffe formats, upgraded as Caffe upgrades them (upgrade_proto.cpp): V1 net files (`layers { type:
CONVOLUTION blobs_lr: 1 weight_decay: 1 }`) to `layer { }` blocks with type strings and `param { lr_mult
decay_mult }`, data layers' transformation fields moved into `transform_param`, and old solver files
(`solver_type: SGD`) to `type: "SGD"`. The upgrade works on the AST and keeps every position, so
diagnostics still point into the old file; `print_text` writes the result back as a prototxt."""
from __future__ import annotations

import json

from .errors import NetdslError
from .registry import layer_types
from .syntax import Field, Message, Scalar, Word


def v1_names() -> dict[str, str]:
    """V1LayerParameter.LayerType enum names -> type strings (UpgradeV1LayerType), from each layer
    class's `v1` (a V1 type netdsl has no class for stays its enum word and is reported unknown)."""
    return {cls.v1[1]: t for t, cls in layer_types().items() if "v1" in vars(cls)}      # not inherited


def v1_numbers() -> dict[int, str]:
    """The same by enum number, as binary .caffemodel files store it."""
    return {cls.v1[0]: t for t, cls in layer_types().items() if "v1" in vars(cls)}


# the fields V1 data layers kept in their own message and that moved to transform_param
# (UpgradeNetDataTransformation); which message is the layer class's `v1_transform_param`
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                "ADADELTA": "AdaDelta", "ADAM": "Adam"}


def is_v1_net(ast: Message) -> bool:
    return bool(ast.get("layers")) and not ast.get("layer")


def upgrade_net(ast: Message) -> Message:
    """A V1 net (`layers` blocks) as a current one. V0 files (a `layer` block nested inside each
    `layers`) are refused: they predate 2014 and Caffe's own V0 upgrade needs their padding layers."""
    fields = []
    for f in ast.fields:
        if f.name == "layers" and isinstance(f.value, Message):
            fields.append(Field("layer", _upgrade_layer(f.value), f.pos))
        else:
            fields.append(f)
    return Message(tuple(fields), ast.pos)


def _upgrade_layer(m: Message) -> Message:
    if m.get("layer"):
        raise NetdslError("E0206", "a V0 net file (a `layer { }` inside `layers { }`, Caffe before 2014)",
                          m.get("layer")[0].pos, help="upgrade it with an old Caffe's upgrade_net_proto_text first")
    out, lrs, decays, names, modes = [], [], [], [], []
    type_ = None
    for f in m.fields:
        if f.name == "type" and isinstance(f.value, Scalar):
            v = f.value.value
            type_ = v1_names().get(str(v), str(v)) if isinstance(v, Word) else str(v)
            out.append(Field("type", Scalar(type_, f.value.pos), f.pos))
        elif f.name == "blobs_lr":
            lrs.append(f)
        elif f.name == "weight_decay":
            decays.append(f)
        elif f.name == "param" and isinstance(f.value, Scalar):       # V1 names shared params this way
            names.append(f)
        elif f.name == "blob_share_mode":
            modes.append(f)
        else:
            out.append(f)
    for i in range(max(len(lrs), len(decays), len(names), len(modes))):
        spec = []
        for key, src in (("name", names), ("lr_mult", lrs), ("decay_mult", decays), ("share_mode", modes)):
            if i < len(src):
                spec.append(Field(key, src[i].value, src[i].pos))
        at = next(s for s in (lrs, decays, names, modes) if i < len(s))[i].pos
        out.append(Field("param", Message(tuple(spec), at), at))
    cls = layer_types().get(type_)
    if cls is not None and cls.v1_transform_param:
        out = _move_transform(out, cls.v1_transform_param)
    first = ("name", "type", "bottom", "top")              # the order Caffe prints a layer in
    out.sort(key=lambda f: first.index(f.name) if f.name in first else len(first))
    return Message(tuple(out), m.pos)


def _move_transform(fields: list[Field], key: str) -> list[Field]:
    """V1 data layers' scale / mean_file / crop_size / mirror, inside their data param, move to
    transform_param (unless the layer already has one)."""
    if any(f.name == "transform_param" for f in fields):
        return fields
    out, moved = [], []
    for f in fields:
        if f.name == key and isinstance(f.value, Message):
            keep = [g for g in f.value.fields if g.name not in _TRANSFORM_FIELDS]
            moved += [g for g in f.value.fields if g.name in _TRANSFORM_FIELDS]
            f = Field(f.name, Message(tuple(keep), f.value.pos), f.pos)
        out.append(f)
    if moved:
        out.append(Field("transform_param", Message(tuple(moved), moved[0].pos), moved[0].pos))
    return out


def upgrade_solver(ast: Message) -> Message:
    """`solver_type: SGD` (an enum) becomes `type: "SGD"`, as Caffe's UpgradeSolverType does."""
    fields = []
    for f in ast.fields:
        if f.name == "solver_type" and isinstance(f.value, Scalar) and not ast.get("type"):
            name = SOLVER_TYPES.get(str(f.value.value).upper(), str(f.value.value))
            fields.append(Field("type", Scalar(name, f.value.pos), f.pos))
        else:
            fields.append(f)
    return Message(tuple(fields), ast.pos)


def print_text(m: Message, indent: int = 0) -> str:
    """A message as protobuf text, two spaces a level (comments are not kept)."""
    pad, lines = "  " * indent, []
    for f in m.fields:
        if isinstance(f.value, Message):
            lines.append(f"{pad}{f.name} {{")
            inner = print_text(f.value, indent + 1)
            if inner:
                lines.append(inner)
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{f.name}: {_value(f.value.value)}")
    return "\n".join(lines)


def _value(v) -> str:
    if isinstance(v, Word):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)
