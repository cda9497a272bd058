"""Serving and scale-out: thin adapters over ``Probe``, each behind its own extra.

- ``gradprobe.serve.triton``: ``gradprobe serve BUNDLE``, the probe behind Triton Inference Server
  (PyTriton, dynamic batching): ``pip install 'gradprobe[serve]'``.
- ``gradprobe.serve.scale``: ``gradprobe score BUNDLE INPUT OUTPUT``, batch scoring with a pool of
  Probe actors on Ray Data, written as Parquet: ``pip install 'gradprobe[scale]'``.
- ``gradprobe.serve.outputs``: the one place that turns probe results into named arrays.

Importing this package imports neither PyTriton nor Ray: they load inside the functions that use them.
"""

