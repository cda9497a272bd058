"""Real data sets read from local files, and the OOD and corrupted sets built from them (no downloads).

- ``fashion_mnist(split)``: Debian's ``dataset-fashion-mnist`` IDX files;
- ``ood_set(name, split)``, ``fmnist_part(part)``: disjoint fit/eval parts for detectors (``OOD_SETS``);
- ``corrupt(images, kind, level)``, ``corrupted_fmnist(...)``: the 8 challenge types x 5 levels;
- ``shift_images(images, kind, level)``, ``shifted_fmnist(...)``: label-preserving shifts (``SHIFTS``).
"""
from .fashion_mnist import FASHION_MNIST_DIR, fashion_mnist  # noqa: F401
from .ood import (CORRUPTIONS, FMNIST_PARTS, LEVELS, OOD_SETS, cache_dir, corrupt, corrupted_fmnist,  # noqa: F401
                  fmnist_part, ood_set)
from .shifts import SHIFTS, shift_images, shifted_fmnist  # noqa: F401
