"""The weights of a graph over 2 GiB, kept in a file of their own beside it.

One ONNX file is one protobuf message, which cannot exceed 2 GiB. ``torch.onnx.export(external_data=True)``
writes the large initializers to a data file; here they are copied into the bundle's weights file, each at
an aligned offset, and the graph's references are rewritten to it. The manifest lists every such tensor
(``GraphWeights``): the runtime hands them to the engine from the checked bytes and never follows a path
the graph names.
"""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import helper

from gradprobe.base.errors import ExportError
from gradprobe.base.fileio import check_plain_name
from gradprobe.base.manifest import WEIGHT_ALIGNMENT, WEIGHT_DTYPES, GraphWeights, WeightTensor

GRAPH_WEIGHTS_FILE = "probe.weights"


def _stored_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes:
    """The bytes the exporter wrote for ``tensor`` in ``folder`` (its own temporary folder)."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = check_plain_name(entries.get("location"), f"external data of {tensor.name}")
    offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
    with open(folder / location, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    return data


def move_weights_apart(model: onnx.ModelProto, folder: Path) -> tuple[bytes, GraphWeights]:
    """Gather the external initializers of ``model`` (exported into ``folder``) into one weights blob,
    rewriting their references in ``model`` to ``GRAPH_WEIGHTS_FILE``; returns the blob and its record."""
    chunks, tensors, offset = [], [], 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dtype.name not in WEIGHT_DTYPES:
            raise ExportError(f"initializer {tensor.name!r} has dtype {dtype.name}; weights kept beside the graph "
                              f"may have {list(WEIGHT_DTYPES)}")
        data = _stored_bytes(tensor, folder)
        expected = math.prod(tensor.dims) * dtype.itemsize
        if len(data) != expected:
            raise ExportError(f"the exporter wrote {len(data)} bytes for initializer {tensor.name!r} of shape "
                              f"{list(tensor.dims)} ({dtype.name}), not {expected}")
        padding = -offset % WEIGHT_ALIGNMENT
        chunks += [b"\0" * padding, data]
        offset += padding
        tensors.append(WeightTensor(tensor.name, dtype.name, tuple(int(d) for d in tensor.dims), offset))
        del tensor.external_data[:]
        for key, value in (("location", GRAPH_WEIGHTS_FILE), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += len(data)
    if not tensors:
        raise ExportError("the exporter kept every initializer inside the graph: nothing to move beside it")
    return b"".join(chunks), GraphWeights(GRAPH_WEIGHTS_FILE, tuple(tensors))
