"""Hypothesis strategies for the fuzzers: images, contrast classes, JSON values and manifest mutations.

Arrays are built by numpy from a few drawn parameters (a seed, a fill, special values, a layout), which
keeps examples small for Hypothesis and still reaches every dtype, rank, layout and value class.
``settings_for(n)``: derandomized (the same cases every run), no deadline, no example database.
"""
from __future__ import annotations

import copy
import math

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Cases per entry point: the default run, and the slow run (the issue asks for at least 500).
FAST, SLOW = 40, 600


def settings_for(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


DTYPES = ["float32"] * 14 + ["float64", "float16", ">f4", "uint8", "int8", "int64", "uint64", "bool",
          "complex64", "object", "U3", "datetime64[s]"]
SPECIAL = [np.nan, np.inf, -np.inf, 1e18, float(np.finfo(np.float32).max), -1.0, 1.0005, 1.002, -0.0005, -0.002,
           1e-45, -0.0, 2.0, 255.0]


@st.composite
def images(draw, chw=(1, 28, 28)):
    """Mostly arrays near [B, C, H, W] float32 in [0, 1]; also other types, dtypes, ranks, shapes, values,
    layouts (strided, Fortran, read-only, masked, subclassed, big-endian)."""
    kind = draw(st.sampled_from(["valid"] * 10 + ["array"] * 14 + ["list", "none", "str", "scalar", "masked", "masked",
                                                                  "subclass"]))
    if kind == "valid":  # what a caller normally passes: the checks after validation need these too
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return rng.random((draw(st.integers(1, 3)), *chw), dtype=np.float32)
    if kind == "none":
        return None
    if kind == "str":
        return draw(st.sampled_from(["image.png", "", "0"]))
    if kind == "scalar":
        return draw(st.sampled_from([0.5, np.float32(0.5), 1, True]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(0, 3))
    shape = [batch, *chw]
    if draw(st.integers(0, 5)) == 0:  # a wrong shape
        shape = draw(st.lists(st.integers(0, 30), min_size=0, max_size=5))
    if math.prod(shape) > 20_000:
        shape = [1, *chw]
    fill = draw(st.sampled_from(["uniform", "uniform", "zeros", "ones", "edge", "constant"]))
    values = {"uniform": lambda: rng.random(shape), "zeros": lambda: np.zeros(shape), "ones": lambda: np.ones(shape),
              "edge": lambda: rng.choice([0.0, 1.0, 1.001, -0.001], size=shape),
              "constant": lambda: np.full(shape, draw(st.sampled_from([0.0, 0.5, 1.0, 1.0009, -0.0009, 1.5, -2.0])))}[fill]()
    values = np.asarray(values, np.float64)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]))):
        if values.size:
            values.flat[rng.integers(values.size)] = draw(st.sampled_from(SPECIAL))
    dtype = draw(st.sampled_from(DTYPES))
    with np.errstate(all="ignore"):
        if dtype in ("object", "U3"):
            array = values.astype(dtype)
        elif dtype == "datetime64[s]":
            array = np.zeros(shape, dtype)
        else:
            array = values.astype(dtype) if np.issubdtype(np.dtype(dtype), np.floating) or dtype.startswith(">") or \
                dtype == "complex64" else np.nan_to_num(values, posinf=0, neginf=0).astype(dtype)
    array = np.asarray(array)
    layout = draw(st.sampled_from(["c", "c", "c", "fortran", "strided", "readonly"]))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim >= 1:
        array = np.repeat(array, 2, axis=-1)[..., ::2]
    elif layout == "readonly":
        array.flags.writeable = False
    if kind == "list":
        return array.tolist()
    if kind == "masked":
        return np.ma.masked_array(array, mask=rng.random(array.shape) < 0.3) if array.dtype.kind != "U" else array
    if kind == "subclass":
        return array.view(_Subclass)
    return array


class _Subclass(np.ndarray):
    """An ndarray subclass, as some libraries hand out."""


CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
_INT_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@st.composite
def one_class(draw):
    """A single contrast value: indices of every integer type and size, names, and things that are neither."""
    kind = draw(st.sampled_from(["index"] * 4 + ["name"] * 2 + ["huge", "other", "0-d"]))
    if kind == "0-d":
        return draw(st.sampled_from([np.array(3), np.array("Coat"), np.array(2**63, np.uint64), np.array(-1, np.int8),
                                     np.array(0.5), np.array([1])]))
    if kind == "index":
        value = draw(st.integers(-3, 12))
        kind_type = draw(st.sampled_from(_INT_TYPES))
        info = np.iinfo(kind_type) if kind_type is not int else None
        if info is not None and not info.min <= value <= info.max:
            return value
        return kind_type(value)
    if kind == "name":
        return draw(st.sampled_from([*CLASS_NAMES, "Giraffe", "", "coat", np.str_("Coat"), " Coat"]))
    if kind == "huge":
        return draw(st.sampled_from([2**63, 2**64 - 1, -(2**63) - 1, 10**30, np.uint64(2**64 - 1),
                                     np.int64(-(2**63)), np.uint64(2**63)]))
    return draw(st.sampled_from([0.5, 1.0, np.float32(2), np.nan, True, False, np.bool_(True), None, b"Coat",
                                 1 + 2j, [], {}, {"a": 1}, object(), np.datetime64(1, "s"), Ellipsis]))


@st.composite
def contrasts(draw, batch: int = 2):
    """None, one class, one per image, one list per image (ragged too), arrays of every dtype, and junk."""
    shape = draw(st.sampled_from(["none", "none", "valid", "valid", "one", "per-image", "per-image", "several",
                                  "array", "junk"]))
    if shape == "valid":
        classes = st.one_of(st.integers(-1, 9), st.sampled_from(CLASS_NAMES))
        return draw(st.one_of(classes, st.lists(classes, min_size=batch, max_size=batch),
                              st.lists(st.lists(classes, min_size=2, max_size=2), min_size=batch, max_size=batch)))
    if shape == "none":
        return None
    if shape == "one":
        return draw(one_class())
    if shape == "per-image":
        items = draw(st.lists(one_class(), min_size=max(0, batch - 1), max_size=batch + 1))
        return draw(st.sampled_from([list, tuple]))(items)
    if shape == "several":
        width = draw(st.integers(0, 3))
        rows = [draw(st.lists(one_class(), min_size=width, max_size=width + draw(st.integers(0, 1))))
                for _ in range(draw(st.integers(batch - 1, batch + 1)))]
        return rows
    if shape == "array":
        dtype = draw(st.sampled_from(["int8", "int64", "uint64", "uint8", "float64", "bool", "U10", "object"]))
        dims = draw(st.sampled_from([(), (batch,), (batch, 2), (batch + 1,), (batch, 0), (1, batch), (batch, 1, 1)]))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        values = rng.integers(-2, 12, size=dims)
        if dtype == "U10":
            return np.array(CLASS_NAMES, dtype)[np.clip(values, 0, 9)] if dims else np.str_("Coat")
        if dtype == "uint64" and draw(st.booleans()):
            return np.full(dims, 2**64 - 1, np.uint64)
        return values.astype(dtype) if dtype != "uint8" else np.clip(values, 0, 255).astype(dtype)
    return draw(st.sampled_from([{"a": 1}, {1, 2}, iter([0, 1]), range(2), b"ab", "", np.zeros((2, 2), np.float32),
                                 [[0, 1], 2], [["Coat"], ["Bag", 1]], [None, None]]))


# -------------------------------------------------------------------------------------- JSON damage
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["NaN", "Infinity", "-Infinity", "B", "float32", "int64", "probe.onnx",
                                          "../x", "/etc/passwd", "tap", "closed", "logits", "\ud800"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=12)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, path + (index,))


@st.composite
def damaged_manifests(draw, golden: dict):
    """``golden`` with 1 to 3 fields replaced (by any JSON, a neighbour's value, or a nudged number),
    deleted, or added: every field of the manifest is a target."""
    data = copy.deepcopy(golden)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))[1:]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        action = draw(st.sampled_from(["replace", "replace", "nudge", "delete", "add", "swap"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add":
            if isinstance(old, dict):
                old[draw(st.text(max_size=8))] = draw(json_values)
            elif isinstance(old, list):
                old.append(draw(json_values) if draw(st.booleans()) or not old else copy.deepcopy(old[-1]))
            else:
                parent[path[-1]] = [old, draw(json_values)]
        elif action == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[path[-1]] = draw(st.sampled_from([old + 1, old - 1, -old, old * 2, 0, old * 1e30, old + 0.5]))
        elif action == "swap":
            other = draw(st.sampled_from(paths))
            source = data
            try:
                for key in other:
                    source = source[key]
            except (KeyError, IndexError, TypeError):
                continue
            parent[path[-1]] = copy.deepcopy(source)
        else:
            parent[path[-1]] = draw(json_values)
    return data
