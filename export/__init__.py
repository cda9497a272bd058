"""The export layer: the only part of gradprobe that imports torch.

``gradprobe.export`` is both this package and a function: ``gradprobe.export(model, example, path)``
calls :func:`gradprobe.export.pipeline.export_bundle` (a classifier bundle), or for a GradCon autoencoder
:func:`gradprobe.export.gradcon_graph.export_gradcon_bundle`. (A package attribute of the same name would
be replaced by this module on import, so the module itself is made callable.)
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, model, *args, **kwargs):
        from .gradcon import GradConCAE

        if isinstance(model, GradConCAE):
            from .gradcon_graph import export_gradcon_bundle

            return export_gradcon_bundle(model, *args, **kwargs)
        from .pipeline import export_bundle

        return export_bundle(model, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
