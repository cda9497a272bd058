"""The runtime: backends behind one contract, registered by name, and the ``ProbeEngine`` that runs them.

Importing this package loads neither torch nor any inference engine; a backend imports its engine
when ``create_backend`` builds it.
"""
from .backend import Backend, backend_names, create_backend, register_backend  # noqa: F401
from .engine import ProbeEngine, build_engine  # noqa: F401
from .validate import (class_index, contrast_matrix, validate_contrast, validate_image_layout,  # noqa: F401
                       validate_images)
