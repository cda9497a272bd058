"""Runtime backends: numpy in, numpy out, behind one contract ``Backend.run(feeds) -> outputs``.

Importing this package loads neither torch nor onnxruntime; a backend imports its engine when built.
"""
from .backend import Backend, make_backend  # noqa: F401
from .validate import validate_contrast, validate_images  # noqa: F401
