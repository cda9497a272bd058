"""The export layer: the only part of gradprobe that imports torch.

``gradprobe.export`` is both this package and a function: ``gradprobe.export(model, example, path)``
calls :func:`gradprobe.export.pipeline.export_bundle`. (A package attribute of the same name would be
replaced by this module on import, so the module itself is made callable.)
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .pipeline import export_bundle

        return export_bundle(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
