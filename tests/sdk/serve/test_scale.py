"""`gradprobe score`: Ray Data scoring on a local Ray instance (2 CPUs), Parquet equal to Probe.run."""
from __future__ import annotations

import io

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the [scale] extra: make serve-setup, then make test-serve")
pytest.importorskip("ray.data", reason="needs the [scale] extra (ray[data], pyarrow)")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import gradprobe  # noqa: E402
from gradprobe import InputError  # noqa: E402
from gradprobe.serve.outputs import is_map, probe_outputs  # noqa: E402
from gradprobe.serve.scale import score  # noqa: E402

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance (2 CPUs) for the module: `score` uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _png(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fmnist_test):
    """A folder with every input kind; returns (folder, {file name: the float32 images Probe.run sees})."""
    images = fmnist_test[0]
    folder = tmp_path_factory.mktemp("score-in")
    expected = {}
    np.save(folder / "a.npy", images[:150])
    expected["a.npy"] = images[:150]
    pixels = np.round(images[150:190] * 255).astype(np.uint8)
    np.save(folder / "b.npy", pixels)
    expected["b.npy"] = pixels.astype(np.float32) / 255
    from PIL import Image

    for i in range(3):
        Image.fromarray(pixels[i, 0]).save(folder / f"c{i}.png")
        expected[f"c{i}.png"] = pixels[i:i + 1].astype(np.float32) / 255
    pq.write_table(pa.table({"image": [_png(p) for p in images[200:230]]}), folder / "d.parquet")
    expected["d.parquet"] = np.round(images[200:230] * 255).astype(np.float32) / 255
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images[230:250]))
    pq.write_table(pa.table({"image": tensor}), folder / "e.parquet")
    expected["e.parquet"] = images[230:250]
    return folder, expected


def read_output(path) -> dict:
    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        out[name] = column.to_numpy_ndarray() if isinstance(column.type, pa.FixedShapeTensorType) \
            else np.asarray(column.to_pylist())
    return out


def check_against_probe(rows: dict, bundle, expected: dict, maps: bool = False):
    from pathlib import Path

    probe = gradprobe.load(bundle)
    names = np.array([Path(s).name for s in rows["source"]])
    assert sorted(set(names)) == sorted(expected)
    for name, images in expected.items():
        mine = names == name
        order = np.argsort(rows["index"][mine])
        assert (rows["index"][mine][order] == np.arange(len(images))).all(), name
        detection = probe.detect(images)
        reference = probe_outputs(detection.probe, detection, probe.explain(images) if maps else None)
        maps_ = [name for name in reference if is_map(name)]
        assert sorted(maps_) == sorted(name for name in rows if is_map(name))
        for column in ("pred", "probs", "confounding_grad_sqnorm", "detector_score", "is_anomalous", *maps_):
            got = rows[column][mine][order]
            if got.dtype.kind == "f":
                np.testing.assert_allclose(got, reference[column], rtol=1e-5, atol=1e-6, err_msg=f"{name} {column}")
            else:
                np.testing.assert_array_equal(got, reference[column], err_msg=f"{name} {column}")
        assert list(rows["pred_name"][mine][order]) == [probe.class_names[i] for i in reference["pred"]]


def test_scores_every_input_kind_like_probe_run(serve_bundle, inputs, tmp_path):
    folder, expected = inputs
    summary = score(serve_bundle, folder, tmp_path / "out", actors=2, batch=32, part_rows=64, progress=False)
    assert summary["images"] == sum(len(v) for v in expected.values()) and summary["skipped"] == 0
    assert summary["parts"] >= 2
    check_against_probe(read_output(tmp_path / "out"), serve_bundle, expected)
    for part in (tmp_path / "out").glob("part-*.parquet"):  # every part holds whole sources only
        rows = read_output(part)
        for source in set(rows["source"]):
            mine = rows["index"][rows["source"] == source]
            assert len(mine) == len(expected[source.rsplit("/", 1)[-1]])


def test_maps_on_request(serve_bundle, inputs, tmp_path):
    folder, expected = inputs
    only = {"b.npy": expected["b.npy"]}
    score(serve_bundle, folder / "b.npy", tmp_path / "out", actors=1, batch=16, maps=True, progress=False)
    rows = read_output(tmp_path / "out")
    assert rows["cam_map"].shape == (40, 28, 28)
    check_against_probe(rows, serve_bundle, only, maps=True)


def test_resumes_by_input_file(serve_bundle, inputs, tmp_path, monkeypatch):
    """A run that dies part-way keeps the parts it finished; the next run scores only what is missing."""
    from gradprobe.serve import scale

    folder, expected = inputs
    write, written = scale._write_part, []

    def write_then_die(*args, **kwargs):
        if written:
            raise KeyboardInterrupt  # as a Ctrl-C or a crash between two parts
        written.append(write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(scale, "_write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        score(serve_bundle, folder, tmp_path / "out", actors=1, batch=32, part_rows=1, progress=False)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "out").glob("*")] == ["part-00000.parquet"]  # no half-written file
    summary = score(serve_bundle, folder, tmp_path / "out", actors=1, batch=32, part_rows=1, progress=False)
    assert summary["skipped"] == 1 and summary["sources"] == len(expected)
    check_against_probe(read_output(tmp_path / "out"), serve_bundle, expected)
    assert score(serve_bundle, folder, tmp_path / "out", progress=False)["skipped"] == len(expected)


def test_worker_errors_come_back_as_gradprobe_errors(serve_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "a.npy", np.full((4, 1, 28, 28), np.nan, np.float32))  # passes the header check
    with pytest.raises(InputError, match="NaN or Inf"):
        score(serve_bundle, folder, tmp_path / "out", progress=False)
    np.save(folder / "a.npy", np.zeros((4, 1, 28, 28), np.float64))
    with pytest.raises(InputError, match="float32"):  # refused from the header, before Ray runs
        score(serve_bundle, folder, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_refuses_to_mix_bundles_or_bad_inputs(serve_bundle, inputs, tmp_path, fmnist_test):
    folder, _ = inputs
    score(serve_bundle, folder / "b.npy", tmp_path / "out", progress=False)
    other = tmp_path / "other"
    gradprobe.export(gradprobe.models.load_pretrained("resnet-fmnist"), fmnist_test[0][:4], other)
    with pytest.raises(InputError, match="another bundle"):
        score(other, folder / "b.npy", tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="no such file"):
        score(serve_bundle, tmp_path / "missing", tmp_path / "out2", progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected PNG/JPEG"):
        score(serve_bundle, tmp_path / "notes.txt", tmp_path / "out3", progress=False)
