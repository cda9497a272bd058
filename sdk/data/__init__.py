"""Real data sets read from local files, and the OOD and corrupted sets built from them (no downloads).

- ``fashion_mnist(split)``: Debian's ``dataset-fashion-mnist`` IDX files; ``fashion_mnist_pooled``,
  ``gpnd_folds``, ``gpnd_split``: the GPND one-class protocol (GradCon's Fashion-MNIST evaluation);
- ``ood_set(name, split)``, ``fmnist_part(part)``: disjoint fit/eval parts for detectors (``OOD_SETS``);
- ``corrupt(images, kind, level)``, ``corrupted_fmnist(...)``: the 8 challenge types x 5 levels;
- ``shift_images(images, kind, level)``, ``shifted_fmnist(...)``: label-preserving shifts (``SHIFTS``).
"""
from .fashion_mnist import (FASHION_MNIST_DIR, fashion_mnist, fashion_mnist_pooled, gpnd_folds,  # noqa: F401
                            gpnd_split)
from .ood import (CORRUPTIONS, FMNIST_PARTS, LEVELS, OOD_SETS, cache_dir, corrupt, corrupted_fmnist,  # noqa: F401
                  fmnist_part, ood_set)
from .shifts import SHIFTS, shift_images, shifted_fmnist  # noqa: F401
