"""A thin ``tritonclient`` wrapper for the served probe: numpy in, ``{output name: array}`` out.

Triton itself rejects a request whose rank, per-image shape, dtype or batch size does not match the model's
typed inputs, before any Python runs (which is what bounds the memory one request can take), so those errors
would carry Triton's wording. The client checks them first, against the server's own metadata, and raises
gradprobe's ``InputError`` with the message ``Probe.run`` would give (``check=False`` sends as is). What
needs the values (NaN, the bundle's range, unknown contrast classes) is checked by the server, and its
error response carries gradprobe's message. Per-image scalars come back as [B, 1], as Triton serves them.
"""
from __future__ import annotations

import numpy as np

from gradprobe import BackendUnavailableError, InputError
from gradprobe.runtime import validate_image_layout


class ProbeClient:
    """``ProbeClient("127.0.0.1:8000")`` (HTTP) or ``ProbeClient("127.0.0.1:8001", protocol="grpc")``.

    ``timeout`` (seconds) bounds connecting and every request, so a dead server fails a call fast
    instead of hanging it.
    """

    def __init__(self, url: str, *, protocol: str = "http", model: str = "gradprobe", timeout: float = 30.0,
                 check: bool = True):
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
        self.check, self._layout = check, None
        if protocol == "http":
            self.client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        else:
            self.client = module.InferenceServerClient(url)

    def _call(self, method, *args, **kwargs):
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        return getattr(self.client, method)(*args, **kwargs)

    def layout(self) -> tuple[tuple[int, ...], int]:
        """The served images' (C, H, W) and the largest request batch, from the server's metadata (once)."""
        if self._layout is None:
            options = {"as_json": True} if self.protocol == "grpc" else {}
            metadata = self._call("get_model_metadata", self.model, **options)
            config = self._call("get_model_config", self.model, **options)
            config = config.get("config", config)
            images = next(item for item in metadata["inputs"] if item["name"] == "images")
            self._layout = (tuple(int(d) for d in images["shape"][1:]), int(config["max_batch_size"]))
        return self._layout

    def _check(self, images) -> None:
        chw, max_batch = self.layout()
        images = validate_image_layout(images, chw, None)
        if len(images) > max_batch:
            raise InputError(f"a request holds at most {max_batch} images (the server's --max-batch), got "
                             f"{len(images)}: split the batch")

    def ready(self) -> bool:
        return bool(self._call("is_model_ready", self.model))

    def infer(self, images, contrast=None, *, maps=None, outputs=None) -> dict[str, np.ndarray]:
        """``images`` [B, C, H, W]; ``contrast`` int64 [B] or [B, 1]; ``maps`` bool [B] or True for all;
        ``outputs``: names to ask for (default: every output except the maps)."""
        from tritonclient.utils import np_to_triton_dtype

        if self.check:
            self._check(images)
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
