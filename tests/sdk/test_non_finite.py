"""A sample whose outputs are not finite is never called normal (issue 10, item 4), shown on a real bundle
whose graph overflows for bright images that are inside the documented input range [0, 1]."""
import numpy as np
import pytest

import gradprobe
from gradprobe import InputError

torch = pytest.importorskip("torch", reason="exporting the overflowing model needs torch")
pytest.importorskip("sklearn", reason="calibrating fits a detector with scikit-learn")
pytestmark = pytest.mark.timeout(600)

DARK = np.random.default_rng(0).uniform(0, 0.02, (16, 1, 28, 28)).astype(np.float32)
BRIGHT = np.ones((2, 1, 28, 28), np.float32)  # in range; the model overflows on it


class Overflow(torch.nn.Module):
    """x * 1e39 through two 1x1 convs (inf in float32 for pixels above ~0.34), scaled back by the third:
    finite outputs for dark images, inf/NaN for bright ones."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.gain1, self.gain2 = nn.Conv2d(1, 1, 1, bias=False), nn.Conv2d(1, 1, 1, bias=False)
        self.conv, self.relu, self.pool, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), \
            nn.Linear(4, 3)
        with torch.no_grad():
            self.gain1.weight.fill_(1e19)
            self.gain2.weight.fill_(1e20)
            self.conv.weight.copy_(torch.linspace(-1, 1, 36).reshape(4, 1, 3, 3) * 1e-38)
            self.conv.bias.fill_(0.1)
            self.fc.weight.copy_(torch.linspace(-1, 1, 12).reshape(3, 4))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(self.gain2(self.gain1(x))))), 1))


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    path = gradprobe.export(Overflow(), torch.from_numpy(DARK[:4]), tmp_path_factory.mktemp("overflow") / "bundle",
                            class_names=["a", "b", "c"])
    probe = gradprobe.load(path)
    probe.calibrate(DARK, kind="ood-free")
    return probe


def test_non_finite_outputs_are_flagged_with_a_reason(overflowing):
    assert overflowing.run(DARK).finite.all()
    result = overflowing.run(BRIGHT)
    assert not result.finite.any() and not np.isfinite(result.logits).all()
    detected = overflowing.detect(np.concatenate([DARK[:2], BRIGHT]))
    assert detected.is_anomalous[2:].all() and np.isinf(detected.score[2:]).all()
    assert detected.reasons[2:].tolist() == ["non-finite outputs"] * 2
    assert "non-finite" not in " ".join(detected.reasons[:2].tolist())
    overflowing.explain(BRIGHT)  # maps of a non-finite sample: no crash


def test_calibrating_on_overflowing_images_is_refused_by_name(overflowing):
    with pytest.raises(InputError, match="not finite.*first at index 16"):
        overflowing.calibrate(np.concatenate([DARK, BRIGHT]), kind="ood-free")


@pytest.mark.parametrize("scale", [1e18, float(np.finfo(np.float32).max)])
def test_out_of_range_inputs_are_rejected_by_the_documented_rule(overflowing, scale):
    """The rule: finite values inside the bundle's input range (manifest input.range, [0, 1]) with 1e-3 slack."""
    images = DARK[:2] * np.float32(scale)
    for call in (overflowing.run, overflowing.explain, overflowing.detect):
        with pytest.raises(InputError, match=r"values in \[0.0, 1.0\]"):
            call(images)
