"""A tiny model with hand-set weights whose maps and gradient norms were worked out by hand.

Model: 1x1 conv making A_0 = x and A_1 = 1 - x (ReLU is the identity on [0,1]), GAP, Linear with
W = [[2, -1], [-1, 1]], b = 0. For the image below, mean(x) = 0.75, so z = (1.25, -0.5) and P = 0.
Grad-CAM:        alpha = W_P / 16 = (2, -1)/16 -> sum = (3x - 1)/16 -> 0.125 (x=1), 0.03125 (x=.5), 0 (x=0)
Counterfactual:  ReLU(-(3x - 1)/16)            -> 0.0625 where x = 0, else 0
Contrastive Q=1: alpha = W^T (p - e_1)/16 = p0 (3, -2)/16 -> p0 (5x - 2)/16, p0 = sigmoid(1.75)
"""
import numpy as np
import pytest
import torch
from torch import nn

import gradprobe

P0 = 0.8519528019683106  # sigmoid(1.75) = softmax((1.25, -0.5))[0]
IMAGE = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, .5, .5], [0, 0, .5, .5]], dtype=np.float32)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    path = gradprobe.export(Tiny(), torch.from_numpy(IMAGE[None, None]), tmp_path_factory.mktemp("tiny") / "b",
                            class_names=["up", "down"])
    return gradprobe.load(path)


def test_hand_computed_maps(tiny_probe):
    result = tiny_probe.run(IMAGE[None, None], contrast=1)
    np.testing.assert_allclose(result.logits, [[1.25, -0.5]], rtol=1e-6)
    assert result.pred.tolist() == [0] and result.contrast_class.tolist() == [1]
    cam = np.array([[.125, .125, .125, .125], [.125, .125, .125, .125],
                    [.125, .125, .03125, .03125], [0, 0, .03125, .03125]])
    counterfactual = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [.0625, .0625, 0, 0]])
    contrastive = P0 / 16 * np.array([[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, .5, .5], [0, 0, .5, .5]])
    np.testing.assert_allclose(result.cam[0], cam, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.counterfactual_cam[0], counterfactual, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.contrastive_cam[0], contrastive, rtol=1e-5, atol=1e-7)
    # Grad-CAM++: g = W_P / 16 = (0.125, -0.0625) everywhere; sum_uv A = (12, 4); only channel 0 has ReLU(g) > 0:
    # a = g^2 / (2 g^2 + 12 g^3 + 1e-6), w_0 = 16 * 0.125 * a, map = w_0 * x
    a = 0.125**2 / (2 * 0.125**2 + 12 * 0.125**3 + 1e-6)
    np.testing.assert_allclose(result.gradcam_pp[0], 2 * a * IMAGE, rtol=1e-5, atol=1e-7)


def test_hand_computed_gradient_norms(tiny_probe):
    result = tiny_probe.run(IMAGE[None, None])
    p1 = 1 - P0
    # ||p - e_q||^2 = 2 p1^2 for q = 0 and 2 p0^2 for q = 1; ||h||^2 + 1 = 0.75^2 + 0.25^2 + 1 = 1.625
    np.testing.assert_allclose(result.label_grad_sqnorm[0], [2 * p1**2 * 1.625, 2 * P0**2 * 1.625], rtol=1e-5)
    # all-ones BCE: delta = sigmoid(z) - 1 = (sigmoid(1.25) - 1, sigmoid(-0.5) - 1)
    delta = np.array([1 / (1 + np.exp(-1.25)), 1 / (1 + np.exp(0.5))]) - 1
    np.testing.assert_allclose(result.confounding_grad_sqnorm[0], [delta @ delta * 0.625, delta @ delta], rtol=1e-5)
    np.testing.assert_allclose(result.features[0], [0.75, 0.25], rtol=1e-6)
