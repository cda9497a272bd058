"""The reference models and the shipped checkpoint (needs the ``[export]`` extra: torch)."""
from gradprobe.export.checkpoint import load_checkpoint, load_pretrained, save_checkpoint  # noqa: F401
from gradprobe.export.models import (FASHION_MNIST_CLASSES, PRESETS, MobileNet, ResNet, VGG,  # noqa: F401
                                     build_model)
