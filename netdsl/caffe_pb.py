"""Caffe's binary formats through the protobuf runtime: the subset of caffe.proto that weights
files, mean files and LMDB records (Datum) use, declared here with caffe.proto's field numbers (netdsl owns the schema;
no protoc step). Blob values are declared as `bytes`, which is how a packed repeated float is laid
out on the wire, so decoding hands NumPy the raw little-endian buffer: no Python loop over floats.
Blobs written unpacked (allowed by protobuf, rare in practice) are decoded by a second declaration
of the same message with `repeated float`."""
from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# message -> [(name, number, label, type, message type or None)]
_MESSAGES = {
    "BlobShape": [("dim", 1, _REP, _F.TYPE_INT64, None)],
    # data/diff/double_* are packed repeated float/double in caffe.proto: the same bytes on the wire
    "BlobProto": [("shape", 7, _OPT, _F.TYPE_MESSAGE, "BlobShape"), ("data", 5, _REP, _F.TYPE_BYTES, None),
                  ("double_data", 8, _REP, _F.TYPE_BYTES, None), ("num", 1, _OPT, _F.TYPE_INT64, None),
                  ("channels", 2, _OPT, _F.TYPE_INT64, None), ("height", 3, _OPT, _F.TYPE_INT64, None),
                  ("width", 4, _OPT, _F.TYPE_INT64, None)],
    "BlobProtoUnpacked": [("shape", 7, _OPT, _F.TYPE_MESSAGE, "BlobShape"), ("data", 5, _REP, _F.TYPE_FLOAT, None),
                          ("double_data", 8, _REP, _F.TYPE_DOUBLE, None), ("num", 1, _OPT, _F.TYPE_INT64, None),
                          ("channels", 2, _OPT, _F.TYPE_INT64, None), ("height", 3, _OPT, _F.TYPE_INT64, None),
                          ("width", 4, _OPT, _F.TYPE_INT64, None)],
    "LayerParameter": [("name", 1, _OPT, _F.TYPE_STRING, None), ("type", 2, _OPT, _F.TYPE_STRING, None),
                       ("blobs", 7, _REP, _F.TYPE_MESSAGE, "BlobProto")],
    "V1LayerParameter": [("name", 4, _OPT, _F.TYPE_STRING, None), ("type", 5, _OPT, _F.TYPE_INT32, None),
                         ("blobs", 6, _REP, _F.TYPE_MESSAGE, "BlobProto"),
                         ("blobs_lr", 7, _REP, _F.TYPE_FLOAT, None), ("weight_decay", 8, _REP, _F.TYPE_FLOAT, None)],
    "NetParameter": [("name", 1, _OPT, _F.TYPE_STRING, None), ("layers", 2, _REP, _F.TYPE_MESSAGE, "V1LayerParameter"),
                     ("layer", 100, _REP, _F.TYPE_MESSAGE, "LayerParameter")],
    # an LMDB record of Caffe's Data layer: raw uint8 pixels (C x H x W, BGR), float_data, or an
    # encoded image file (encoded: true); float_data is unpacked in caffe.proto
    "Datum": [("channels", 1, _OPT, _F.TYPE_INT32, None), ("height", 2, _OPT, _F.TYPE_INT32, None),
              ("width", 3, _OPT, _F.TYPE_INT32, None), ("data", 4, _OPT, _F.TYPE_BYTES, None),
              ("label", 5, _OPT, _F.TYPE_INT32, None), ("float_data", 6, _REP, _F.TYPE_FLOAT, None),
              ("encoded", 7, _OPT, _F.TYPE_BOOL, None)],
}

@lru_cache(maxsize=1)
def messages() -> dict:
    """The message classes, by name."""
    fdp = descriptor_pb2.FileDescriptorProto(name="netdsl_caffe.proto", package="netdsl_caffe", syntax="proto2")
    for name, fields in _MESSAGES.items():
        m = fdp.message_type.add(name=name)
        for fname, number, label, ftype, mtype in fields:
            f = m.field.add(name=fname, number=number, label=label, type=ftype)
            if mtype:
                f.type_name = f".netdsl_caffe.{mtype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"netdsl_caffe.{name}"))
            for name in _MESSAGES}
