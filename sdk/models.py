"""The reference models and the shipped checkpoint (needs the ``[export]`` extra: torch)."""
from gradprobe.export.checkpoint import (load_checkpoint, load_pretrained, read_metadata,  # noqa: F401
                                         save_checkpoint)
from gradprobe.export.models import (FASHION_MNIST_CLASSES, PRESETS, MobileNet, ResNet, VGG,  # noqa: F401
                                     build_model)
