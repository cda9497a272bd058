"""Pictures: bilinear upsampling and normalisation, and PNGs whose heat lies where the maps are high."""
import numpy as np
import pytest

from gradprobe.base.manifest import MapSpec
from gradprobe.explain import Explanation
from gradprobe.viz import explanation_figure, normalize_maps, upsample

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def test_upsample_is_bilinear_with_half_pixel_centres():
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    big = upsample(maps, (4, 4))
    assert big.shape == (1, 4, 4)
    np.testing.assert_allclose(big[0, 0], [0, 0.25, 0.75, 1.0])      # cv2.resize / align_corners=False
    np.testing.assert_allclose(big[0, :, 0], [0, 0.5, 1.5, 2.0])
    np.testing.assert_allclose(upsample(np.ones((2, 3, 5)), (7, 9)), 1.0, rtol=1e-6)


def test_normalize_maps_per_map_and_constant_maps_become_zero():
    maps = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 5.0)])
    out = normalize_maps(maps)
    np.testing.assert_allclose(out[0], [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    assert (out[1] == 0).all() and out.dtype == np.float32


def _explanation(rows: int, size: int = 28):
    heat = np.zeros((rows, size, size), np.float32)
    heat[:, : size // 3, :] = 1.0                      # hot along the top third, cold elsewhere
    specs = (MapSpec("cam", "predicted_logit", "mean_gradient", 1, "why {P}?", False),
             MapSpec("contrastive_cam", "contrast_cross_entropy", "mean_gradient", 1, "why {P},\nrather than {Q}?",
                     True))
    probs = np.full((rows, 3), 1 / 3, np.float32)
    return Explanation(maps={"cam": heat, "contrastive_cam": heat.copy()}, specs=specs, pred=np.zeros(rows, np.int64),
                       contrast=np.ones(rows, np.int64), probs=probs, class_names=["a", "b", "c"],
                       empty={"cam": np.zeros(rows, bool), "contrastive_cam": np.zeros(rows, bool)})


def test_png_decodes_grows_with_rows_and_puts_heat_where_the_map_is_high(tmp_path):
    images = np.full((2, 1, 28, 28), 0.5, np.float32)
    one = explanation_figure(images[:1], _explanation(1), tmp_path / "one.png")
    two = explanation_figure(images, _explanation(2), tmp_path / "two.png", labels=[0, 1], title="t")
    with Image.open(one) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    with Image.open(two) as picture:
        assert picture.size[1] > 1.7 * height and abs(picture.size[0] - width) < 0.2 * width
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red = (r > b + 40) & (r > g + 40)      # jet's top end blended over the gray input
    blue = (b > r + 40) & (b > g + 40)     # jet's bottom end
    assert red.sum() > 500 and blue.sum() > 500
    rows_red, rows_blue = np.nonzero(red)[0], np.nonzero(blue)[0]
    assert rows_red.mean() < rows_blue.mean()                # the hot top third is drawn above the cold rest
    assert np.percentile(rows_red, 95) < np.percentile(rows_blue, 50)
    columns_red = np.nonzero(red)[1]
    assert columns_red.min() > width / 3 * 0.9               # no heat on the input panel (first third)
    assert not list(tmp_path.glob(".*.tmp"))                 # written atomically


def test_normalised_maps_do_not_depend_on_the_maps_scale():
    """Min-max normalisation without an epsilon on the range: a map whose values span 1e-4 (a random-init
    AlexNet's Grad-CAM) looks as the same map at scale 1 does; a constant map is all zeros."""
    maps = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    maps[2] = 0.25
    small, large = normalize_maps(maps * 1e-4), normalize_maps(maps)
    np.testing.assert_allclose(small, large, atol=1e-6)
    assert small[:2].max() == 1.0 and small[:2].min() == 0.0 and not small[2].any()
