"""Fuzzing the facade's entry points on a real calibrated bundle: ``Probe.run``, ``Probe.explain``,
``Probe.detect`` with fuzzed images and classes, and ``gradprobe.load`` on damaged manifests. Every case is
a gradprobe error or a documented accept (checked), never another exception. Seeded (derandomized)."""
import collections
import copy
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradprobe
from gradprobe import GradprobeError
from tests.strategies import FAST, SLOW, contrasts, damaged_manifests, images, settings_for

pytestmark = pytest.mark.timeout(1200)
SIZES = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def probe(bundles):
    return gradprobe.load(bundles["calibrated"])


@st.composite
def images_and_classes(draw):
    value = draw(images())
    batch = len(value) if isinstance(value, np.ndarray) and value.ndim >= 1 else 2
    return value, draw(contrasts(batch=max(batch, 1)))


def _report(name, tally, examples):
    print(f"\nfuzz {name}: {sum(tally.values())} cases: {dict(tally)}")
    assert sum(tally.values()) >= examples


def _fuzz(name, examples, call, check_accepted):
    tally = collections.Counter()

    @settings_for(examples)
    @given(images_and_classes())
    def check(case):
        value, contrast = case
        try:
            outcome = call(value, contrast)
        except GradprobeError as error:
            tally[type(error).__name__] += 1
            return
        tally["accepted"] += 1
        check_accepted(np.asarray(value), outcome)

    check()
    _report(name, tally, examples)


@pytest.mark.parametrize("examples", SIZES)
def test_run(probe, examples):
    def accepted(images, result):
        assert len(result) == len(images) and result.finite.all()
        assert ((result.contrast_class >= 0) & (result.contrast_class < 10)).all()

    _fuzz("Probe.run", examples, probe.run, accepted)


@pytest.mark.parametrize("examples", SIZES)
def test_explain(probe, examples):
    def accepted(images, explanation):
        assert len(explanation) == len(images)
        for maps in explanation.maps.values():
            assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
            assert maps.shape[0] == len(images) and maps.shape[-2:] == (28, 28)

    _fuzz("Probe.explain", examples, probe.explain, accepted)


@pytest.mark.parametrize("examples", SIZES)
def test_detect(probe, examples):
    def accepted(images, detected):
        assert len(detected) == len(images) and detected.is_anomalous.dtype == bool
        assert np.isfinite(detected.score).all()  # in-range inputs: the shipped model stays finite
        assert (detected.is_anomalous == (detected.score > detected.threshold)).all()

    _fuzz("Probe.detect", examples, lambda value, contrast: probe.detect(value), accepted)


@pytest.mark.parametrize("examples", [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow",
                                                                                   marks=pytest.mark.slow)])
def test_load_damaged_manifests(bundles, tmp_path, examples):
    """A damaged manifest beside the real files: refused, or it loads and runs the graph it verified."""
    source = bundles["calibrated"]
    golden = json.loads((source / "manifest.json").read_text())
    images = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(1, 1, 28, 28)
    reference = gradprobe.load(source).run(images).logits
    tally = collections.Counter()
    counter = iter(range(10**9))

    @settings_for(examples)
    @given(damaged_manifests(golden))
    def check(data):
        folder = tmp_path / f"case-{next(counter)}"
        folder.mkdir()
        for entry in source.iterdir():
            if entry.name != "manifest.json":
                os.link(entry, folder / entry.name)
        (folder / "manifest.json").write_text(json.dumps(copy.deepcopy(data)))
        try:
            loaded = gradprobe.load(folder)
            result = loaded.run(images)
            if loaded.manifest.detector is not None:
                loaded.detect(images)
        except GradprobeError as error:
            tally[type(error).__name__] += 1
        else:
            tally["accepted"] += 1
            np.testing.assert_array_equal(result.logits, reference)  # the verified graph, whatever else changed
        shutil.rmtree(folder)

    check()
    _report("gradprobe.load (damaged manifests)", tally, examples)
