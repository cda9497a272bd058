"""Fuzzing ``Manifest.from_json`` with damaged copies of a real manifest: every case is a BundleError or a
manifest that writes back and reads again to itself; never another exception. Seeded (derandomized)."""
import collections
import copy
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradprobe.base.errors import BundleError
from gradprobe.base.manifest import Manifest
from tests.strategies import FAST, SLOW, damaged_manifests, json_values, settings_for

pytestmark = pytest.mark.timeout(600)
GOLDEN = json.loads((Path(__file__).parent / "data" / "manifest-deep.json").read_text())


@pytest.mark.parametrize("examples", [pytest.param(FAST * 3, id="fast"),
                                      pytest.param(SLOW, id="slow", marks=pytest.mark.slow)])
def test_manifest_from_json(examples):
    tally = collections.Counter()

    @settings_for(examples)
    @given(st.one_of(damaged_manifests(GOLDEN), damaged_manifests(GOLDEN), json_values))
    def check(data):
        try:
            manifest = Manifest.from_json(copy.deepcopy(data))
        except BundleError:
            tally["BundleError"] += 1
            return
        tally["accepted"] += 1
        written = json.dumps(manifest.to_json(), allow_nan=False)
        assert Manifest.from_json(json.loads(written)) == manifest

    check()
    print(f"\nfuzz Manifest.from_json: {sum(tally.values())} cases: {dict(tally)}")
    assert sum(tally.values()) >= examples
