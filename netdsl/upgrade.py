"""Old Caffe formats, upgraded as Caffe upgrades them (upgrade_proto.cpp): V1 net files (`layers { type:
CONVOLUTION blobs_lr: 1 weight_decay: 1 }`) to `layer { type: "Convolution" param { lr_mult decay_mult } }`
with data layers' transformation fields moved into `transform_param`, and old solver files
(`solver_type: SGD`) to `type: "SGD"`. The upgrade works on the AST and keeps every position, so
diagnostics still point into the old file; `print_text` writes the result back as a prototxt."""
from __future__ import annotations

import json

from .errors import NetdslError
from .syntax import Field, Message, Scalar, Word

# V1LayerParameter.LayerType (caffe.proto): enum number, enum name, today's type string
# (UpgradeV1LayerType); text files name the enum, binary .caffemodel files store its number
V1_LAYER_TYPES = (
    (1, 'ACCURACY', 'Accuracy'), (2, 'BNLL', 'BNLL'), (3, 'CONCAT', 'Concat'), (4, 'CONVOLUTION', 'Convolution'),
    (5, 'DATA', 'Data'), (6, 'DROPOUT', 'Dropout'), (7, 'EUCLIDEAN_LOSS', 'EuclideanLoss'),
    (8, 'FLATTEN', 'Flatten'), (9, 'HDF5_DATA', 'HDF5Data'), (10, 'HDF5_OUTPUT', 'HDF5Output'),
    (11, 'IM2COL', 'Im2col'), (12, 'IMAGE_DATA', 'ImageData'), (13, 'INFOGAIN_LOSS', 'InfogainLoss'),
    (14, 'INNER_PRODUCT', 'InnerProduct'), (15, 'LRN', 'LRN'),
    (16, 'MULTINOMIAL_LOGISTIC_LOSS', 'MultinomialLogisticLoss'), (17, 'POOLING', 'Pooling'), (18, 'RELU', 'ReLU'),
    (19, 'SIGMOID', 'Sigmoid'), (20, 'SOFTMAX', 'Softmax'), (21, 'SOFTMAX_LOSS', 'SoftmaxWithLoss'),
    (22, 'SPLIT', 'Split'), (23, 'TANH', 'TanH'), (24, 'WINDOW_DATA', 'WindowData'), (25, 'ELTWISE', 'Eltwise'),
    (26, 'POWER', 'Power'), (27, 'SIGMOID_CROSS_ENTROPY_LOSS', 'SigmoidCrossEntropyLoss'),
    (28, 'HINGE_LOSS', 'HingeLoss'), (29, 'MEMORY_DATA', 'MemoryData'), (30, 'ARGMAX', 'ArgMax'),
    (31, 'THRESHOLD', 'Threshold'), (32, 'DUMMY_DATA', 'DummyData'), (33, 'SLICE', 'Slice'), (34, 'MVN', 'MVN'),
    (35, 'ABSVAL', 'AbsVal'), (36, 'SILENCE', 'Silence'), (37, 'CONTRASTIVE_LOSS', 'ContrastiveLoss'),
    (38, 'EXP', 'Exp'), (39, 'DECONVOLUTION', 'Deconvolution'),
)
V1_NAMES = {name: type_ for _, name, type_ in V1_LAYER_TYPES}
V1_NUMBERS = {number: type_ for number, _, type_ in V1_LAYER_TYPES}
# where V1 data layers kept the fields that moved to transform_param (UpgradeNetDataTransformation)
_DATA_PARAMS = {"Data": "data_param", "ImageData": "image_data_param", "WindowData": "window_data_param"}
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
            type_ = V1_NAMES.get(str(v), str(v)) if isinstance(v, Word) else str(v)
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
    if type_ in _DATA_PARAMS:
        out = _move_transform(out, _DATA_PARAMS[type_])
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
