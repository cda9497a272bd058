"""A thin ``tritonclient`` wrapper for the served probe: numpy in, ``{output name: array}`` out.

Nothing is checked client-side: what you pass is what the server sees, so its answers (and errors)
are the server's. Per-image scalars come back as [B, 1], as Triton serves them.
"""
from __future__ import annotations

import numpy as np

from gradprobe import BackendUnavailableError


class ProbeClient:
    """``ProbeClient("127.0.0.1:8000")`` (HTTP) or ``ProbeClient("127.0.0.1:8001", protocol="grpc")``.

    ``timeout`` (seconds) bounds connecting and every request, so a dead server fails a call fast
    instead of hanging it.
    """

    def __init__(self, url: str, *, protocol: str = "http", model: str = "gradprobe", timeout: float = 30.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as module
            else:
                import tritonclient.grpc as module
        except ImportError as error:
            raise BackendUnavailableError("the Triton client needs tritonclient: pip install 'gradprobe[serve]'") \
                from error
        self.module, self.protocol, self.model, self.timeout = module, protocol, model, timeout
        if protocol == "http":
            self.client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        else:
            self.client = module.InferenceServerClient(url)

    def _call(self, method, *args, **kwargs):
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        return getattr(self.client, method)(*args, **kwargs)

    def ready(self) -> bool:
        return bool(self._call("is_model_ready", self.model))

    def infer(self, images, contrast=None, *, maps=None, outputs=None) -> dict[str, np.ndarray]:
        """``images`` [B, C, H, W]; ``contrast`` int64 [B] or [B, 1]; ``maps`` bool [B] or True for all;
        ``outputs``: names to ask for (default: every output except the maps)."""
        from tritonclient.utils import np_to_triton_dtype

        feeds = {"images": np.asarray(images)}
        if contrast is not None:
            feeds["contrast"] = np.asarray(contrast).reshape(len(feeds["images"]), -1)
        if maps is not None:
            feeds["maps"] = np.broadcast_to(np.asarray(maps, dtype=bool), (len(feeds["images"]),)).reshape(-1, 1).copy()
        inputs = []
        for name, array in feeds.items():
            tensor = self.module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [self.module.InferRequestedOutput(name) for name in outputs] if outputs else None
        answer = self._call("infer", self.model, inputs, outputs=requested)
        names = [o["name"] if isinstance(o, dict) else o.name
                 for o in (answer.get_response()["outputs"] if self.protocol == "http"
                           else answer.get_response().outputs)]
        return {name: answer.as_numpy(name) for name in names}

    def close(self) -> None:
        self.client.close()
