"""TensorRT: engine records and their refusal, the build's use of the API, and (with a GPU) parity with ONNX Runtime.

What runs where: everything above the ``trt`` section runs on any machine. The build tests drive
``build_engine`` against ``FakeTensorRT``, a stand-in written from TensorRT's documented Python API
(the calls and signatures it records are the ones the docstrings in NVIDIA/TensorRT
``python/docstrings/infer/pyCoreDoc.h`` and ``parsers/pyOnnxDoc.h`` give): it checks our use of the API
(flags, profile shapes, workspace, timing cache) and the bundle writes, not TensorRT. The ``trt`` tests
build and run real engines; they need TensorRT and an NVIDIA GPU and skip visibly without them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import shutil
import sys
import types

import numpy as np
import pytest

import gradprobe
from gradprobe import BackendUnavailableError, BundleError, InputError
from gradprobe.base.bundle import Bundle
from gradprobe.base.manifest import EngineRecord
from gradprobe.runtime import cuda, tensorrt_backend
from gradprobe.runtime.tensorrt_backend import select_engine

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
H200 = cuda.Device(0, "NVIDIA H200", (9, 0), 141 << 30)


def _record(graph_sha: str, **changes) -> EngineRecord:
    record = EngineRecord("engine-00000000aaaaaaaa.plan", "11.4.0.106", "NVIDIA H200", (9, 0), "fp32", (1, 32, 256),
                          graph_sha, None, "2026-11-29T00:00:00Z")
    return dataclasses.replace(record, **changes)


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    path = tmp_path / "deep"
    shutil.copytree(bundles["deep"], path)
    return path


# ------------------------------------------------------------------------------ engine selection
@pytest.mark.parametrize(("changes", "words"), [
    ({"tensorrt": "10.13.0.35"}, "stale: this is TensorRT 11.4.0.106"),
    ({"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": (8, 0)}, "foreign to this NVIDIA H200"),
    ({"graph_sha256": "0" * 64}, "from another graph (stale)"),
    ({"precision": "fp16"}, "not fp32"),
])
def test_stale_or_foreign_engines_are_refused_with_the_rebuild_command(bundles, changes, words):
    manifest = Bundle.open(bundles["deep"]).manifest
    sha = manifest.files[manifest.graph].sha256
    record = _record(sha, **changes)
    manifest = dataclasses.replace(manifest, engines=(record,), files={**manifest.files, record.file: record_file()})
    with pytest.raises(BundleError) as caught:
        select_engine(manifest, bundle="b", tensorrt="11.4.0.106", gpu="NVIDIA H200", compute_capability=(9, 0),
                      precision="fp32", graph_sha256=sha)
    assert words in str(caught.value) and "Rebuild it on this machine with: gradprobe build b" in str(caught.value)


def record_file():
    from gradprobe.base.manifest import FileRecord

    return FileRecord("a" * 64, 10)


def test_the_fitting_engine_with_the_widest_profile_is_chosen(bundles):
    manifest = Bundle.open(bundles["deep"]).manifest
    sha = manifest.files[manifest.graph].sha256
    narrow = _record(sha, profile=(1, 8, 64))
    wide = _record(sha, file="engine-00000000bbbbbbbb.plan")
    other = _record(sha, file="engine-00000000cccccccc.plan", gpu="Tesla T4", compute_capability=(7, 5))
    files = {**manifest.files, **{r.file: record_file() for r in (narrow, wide, other)}}
    manifest = dataclasses.replace(manifest, engines=(narrow, wide, other), files=files)
    chosen = select_engine(manifest, bundle="b", tensorrt="11.4.0.106", gpu="NVIDIA H200", compute_capability=(9, 0),
                           precision="fp32", graph_sha256=sha)
    assert chosen is wide
    with pytest.raises(BundleError, match=r"holds no TensorRT engine.*gradprobe build b --fp16"):
        select_engine(dataclasses.replace(manifest, engines=()), bundle="b", tensorrt="11.4.0.106",
                      gpu="NVIDIA H200", compute_capability=(9, 0), precision="fp16", graph_sha256=sha)


# ------------------------------------------------------------------------- without TensorRT
@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT paths cannot be seen")
def test_without_tensorrt_load_build_and_cli_name_the_extra(bundles, capsys):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'gradprobe\[gpu\]'"):
        gradprobe.load(bundles["deep"], backend="tensorrt")
    from gradprobe.export.tensorrt_build import build_engine

    with pytest.raises(BackendUnavailableError, match=r"gradprobe\[gpu\]"):
        build_engine(bundles["deep"])
    from gradprobe.cli import main

    assert main(["build", str(bundles["deep"]), "--batch", "1:8:64"]) == 2
    assert "gradprobe[gpu]" in capsys.readouterr().err


def test_batch_profile_is_checked_before_anything_is_built():
    from gradprobe.export.tensorrt_build import parse_profile, profile_shapes

    assert parse_profile("1:32:256") == (1, 32, 256) and parse_profile("8") == (8, 8, 8)
    for bad in ("0:1:2", "4:2:8", "1:2", "a:b:c", "1:2:100000"):
        with pytest.raises(InputError, match="MIN:OPT:MAX"):
            parse_profile(bad)
    assert profile_shapes((-1, 1, 28, 28), (1, 32, 256)) == ((1, 1, 28, 28), (32, 1, 28, 28), (256, 1, 28, 28))
    assert profile_shapes((-1,), (2, 4, 8)) == ((2,), (4,), (8,))


# ------------------------------------------------------------- the build, against the documented API
class FakeTensorRT(types.ModuleType):
    """Records the calls ``build_engine`` makes; signatures as TensorRT's Python docstrings give them."""

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__, self.calls = version, []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, min_severity):
                fake.calls.append(("Logger", min_severity))

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            inputs = [Tensor("images", (-1, 1, 28, 28)), Tensor("contrast", (-1,))]
            num_inputs = 2

            def get_input(self, index):
                return self.inputs[index]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, model):
                fake.calls.append(("parse", hashlib.sha256(model).hexdigest()))
                return True

            def get_error(self, index):
                raise AssertionError("no errors recorded")

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return memoryview(b"CACHE" + self.data)

            def combine(self, other, ignore_mismatch):
                fake.calls.append(("combine", ignore_mismatch))
                return True

        class Profile:
            def set_shape(self, input, min, opt, max):  # noqa: A002 - the documented argument names
                fake.calls.append(("set_shape", input, tuple(min), tuple(opt), tuple(max)))

        class Config:
            cache = None

            def set_memory_pool_limit(self, pool, pool_size):
                fake.calls.append(("set_memory_pool_limit", pool, pool_size))

            def add_optimization_profile(self, profile):
                return 0

            def create_timing_cache(self, serialized_timing_cache):
                return Cache(bytes(serialized_timing_cache))

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return memoryview(b"PLAN-" + fake.__version__.encode())

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")


@pytest.fixture
def fake_tensorrt(monkeypatch):
    def install(version: str) -> FakeTensorRT:
        fake = FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(tensorrt_backend, "_LOGGER", None)
        monkeypatch.setattr(cuda, "device", lambda ordinal=0: H200)
        return fake

    return install


@pytest.mark.parametrize(("version", "flags"), [("10.13.0.35", 1 << 1), ("11.4.0.106", 0)])
def test_build_uses_the_current_api_and_stores_the_engine_atomically(fake_tensorrt, bundle_copy, tmp_path,
                                                                     version, flags):
    from gradprobe.export.tensorrt_build import build_engine

    fake = fake_tensorrt(version)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    record = build_engine(bundle_copy, batch="1:16:64", workspace_mib=512, timing_cache=cache, log=lambda _: None)
    calls = fake.calls
    assert ("create_network", flags) in calls  # STRONGLY_TYPED on 10.x; TensorRT 11 is strongly typed only
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in calls
    assert ("set_shape", "images", (1, 1, 28, 28), (16, 1, 28, 28), (64, 1, 28, 28)) in calls
    assert ("set_shape", "contrast", (1,), (16,), (64,)) in calls
    assert ("set_timing_cache", b"old", False) in calls and ("combine", False) in calls
    assert cache.read_bytes().startswith(b"CACHE")
    manifest = Bundle.open(bundle_copy).manifest
    assert manifest.engines == (record,) and record.profile == (1, 16, 64) and record.tensorrt == version
    assert record.gpu == "NVIDIA H200" and record.compute_capability == (9, 0) and record.precision == "fp32"
    assert Bundle.open(bundle_copy).read(record.file) == f"PLAN-{version}".encode()

    again = build_engine(bundle_copy, batch="1:16:64", timing_cache=cache, log=lambda _: None)
    assert Bundle.open(bundle_copy).manifest.engines == (again,)  # same key: replaced, not added
    other = build_engine(bundle_copy, batch="1:8:8", timing_cache=cache, log=lambda _: None)
    assert {e.file for e in Bundle.open(bundle_copy).manifest.engines} == {again.file, other.file}
    if again.file != record.file:
        assert not (bundle_copy / record.file).exists()


def test_fp16_build_parses_the_float16_graph(fake_tensorrt, bundle_copy, tmp_path):
    pytest.importorskip("onnx", reason="the float16 graph rewrite needs onnx")
    from gradprobe.export.fp16 import to_fp16
    from gradprobe.export.tensorrt_build import build_engine

    fake = fake_tensorrt("11.4.0.106")
    record = build_engine(bundle_copy, fp16=True, timing_cache=tmp_path / "c", log=lambda _: None)
    graph = Bundle.open(bundle_copy).read("probe.onnx")
    assert ("parse", hashlib.sha256(to_fp16(graph)).hexdigest()) in fake.calls
    assert record.precision == "fp16" and record.graph_sha256 == hashlib.sha256(graph).hexdigest()


def test_loading_refuses_an_engine_built_elsewhere(fake_tensorrt, bundle_copy, tmp_path, monkeypatch):
    from gradprobe.export.tensorrt_build import build_engine

    fake_tensorrt("11.4.0.106")
    build_engine(bundle_copy, timing_cache=tmp_path / "c", log=lambda _: None)
    monkeypatch.setattr(cuda, "device", lambda ordinal=0: cuda.Device(0, "NVIDIA L4", (8, 9), 24 << 30))
    with pytest.raises(BundleError, match=r"foreign to this NVIDIA L4.*gradprobe build .*deep"):
        gradprobe.load(bundle_copy, backend="tensorrt")
    fake_tensorrt("11.5.0.1")
    with pytest.raises(BundleError, match=r"stale: this is TensorRT 11.5.0.1"):
        gradprobe.load(bundle_copy, backend="tensorrt")


# ----------------------------------------------------------------------- real TensorRT, real GPU
def _gpu_reason() -> str | None:
    if not HAVE_TENSORRT:
        return "TensorRT is not installed (pip install 'gradprobe[gpu]' on a machine with an NVIDIA GPU)"
    try:
        cuda.device(0)
    except BackendUnavailableError as error:
        return str(error)
    return None


GPU_REASON = _gpu_reason()
needs_tensorrt = pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))


@pytest.fixture(scope="module")
def built(bundles, tmp_path_factory):
    from gradprobe.export.tensorrt_build import build_engine

    path = tmp_path_factory.mktemp("trt") / "deep"
    shutil.copytree(bundles["deep"], path)
    build_engine(path, batch="1:16:64")
    build_engine(path, batch="1:16:64", fp16=True)
    return path


@pytest.mark.trt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_onnxruntime(built, precision, fmnist_test):
    """fp32: the parity bound of every backend (1e-4); fp16: ``FP16_TOLERANCES``, stated and measured in
    export/fp16.py."""
    from gradprobe.export.fp16 import FP16_TOLERANCES, fp16_errors
    from gradprobe.export.parity import parity_errors

    path = built
    images = fmnist_test[0][:40]
    reference = gradprobe.load(path).run(images, "Coat").outputs
    with gradprobe.load(path, backend="tensorrt", precision=precision, max_batch=16) as probe:
        ours = probe.run(images, "Coat").outputs
        assert probe.engine.describe()["precision"] == precision
    if precision == "fp32":
        errors = parity_errors(ours, reference)
        assert max(errors.values()) <= 1e-4, errors
    else:
        errors = fp16_errors(ours, reference)
        assert all(errors[name] <= FP16_TOLERANCES[name] for name in errors), errors


@pytest.mark.trt
@pytest.mark.gpu
@needs_tensorrt
def test_device_inputs_are_bound_without_copies_and_norms_stay_on_the_device(built, fmnist_test):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA: no device tensors to feed")
    from gradprobe.runtime import ProbeEngine, create_backend

    bundle = Bundle.open(built)
    images = fmnist_test[0][:8]
    contrast = np.full(8, -1, np.int64)
    host = gradprobe.load(built).run(images).outputs
    backend = create_backend("tensorrt", bundle.read("probe.onnx"), bundle=bundle, outputs="device")
    engine = ProbeEngine(backend, bundle.manifest)
    on_gpu = torch.from_numpy(images).cuda()
    outputs = engine.infer(on_gpu, {"contrast": torch.from_numpy(contrast).cuda()}, validated=True)
    assert all(cuda.is_device_array(v) for v in outputs.values())
    norms = torch.as_tensor(outputs["layer_grad_sqnorm"], device="cuda").cpu().numpy()
    np.testing.assert_allclose(norms, host["layer_grad_sqnorm"], rtol=1e-4, atol=1e-8)
    first = outputs["logits"].pointer
    assert engine.infer(on_gpu, {"contrast": torch.from_numpy(contrast).cuda()}, validated=True)["logits"].pointer \
        == first  # buffers are reused
