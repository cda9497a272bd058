"""Out-of-distribution and corrupted-input detectors on gradient features (docs/METHODS.md §1).

Every score is oriented one way: **higher means more anomalous**. Detectors are classes registered by
name (``DETECTORS``) with one vocabulary: ``fit(features, labels=None) -> self``, ``score(features)``,
``save() -> bytes``, ``load(bytes)``. Fitting uses scikit-learn; scoring is plain numpy, so
``Probe.detect`` needs neither scikit-learn nor torch.
"""
from .base import DETECTORS, Detector, register_detector  # noqa: F401
from .calibrate import (DetectionResult, detection_result, f1_of_normal, fit_detector, threshold_at_tpr,  # noqa: F401
                        threshold_max_f1)
from .detectors import GaussianDetector, LastLayerMLPDetector, MLPDetector  # noqa: F401
from .features import EPS, gradient_features, gradnorm_score  # noqa: F401
