"""The probe graph as a torch module: forward pass plus the probing losses' backward, as plain ops.

Formulas: docs/METHODS.md §1 (confounding label, closed form at the last layer) and §3 (the maps, from the
table in ``maps``). ``forward`` returns the outputs by name; ``OrderedOutputs`` fixes their order for the
ONNX exporter from the same names.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from gradprobe.base.errors import ExportError
from gradprobe.base.manifest import TensorSpec

from . import maps as explanation_maps
from .backward import Backward, make_call, where
from .contrastive import MEANINGS as CONTRASTIVE_MEANINGS
from .contrastive import contrastive_features
from .generic import (VJPCache, batch_of, check_traceable, free_batch, per_image, per_sample_norms,
                      tensor_sizes)
from .graph import ProbeGraph
from .layer_grads import (ParameterNorm, PatchExtractor, as_map, closed_form_sqnorm, confounding_logit_grad,
                          expanded_sqnorm, gram_sqnorm)

#: What each non-map output means (maps describe themselves through the table).
MEANINGS = {
    "logits": "z = W h + b, [B, C]",
    "probs": "softmax(z), [B, C]",
    "pred": "argmax z, [B] int64",
    "features": "h, the input of the last Linear (a pooled-conv head's input averaged over positions), [B, d]",
    "contrast_class": "Q used for the contrastive map (contrast input, -1 resolved to the runner-up), [B] int64",
    "label_grad_sqnorm": "||dCE(z,q)/d(W,b)||^2 of the last layer for every class q, [B, C]",
    "confounding_grad_sqnorm": "[||dJ/dW||^2, ||dJ/db||^2] for the all-ones confounding label, "
                               "J = BCE-with-logits summed over classes, [B, 2]",
    "layer_grad_sqnorm": "squared L2 norm of every parameter tensor's per-sample gradient for the all-ones "
                         "confounding label, model.named_parameters() order, [B, P]",
    "tap_input": "input of a conv whose weight-gradient norm the kernels complete, [B, C, H, W]",
    "tap_grad": "output gradient of that conv for the confounding loss, [B, O, Ho, Wo]",
    **{f"contrastive_{variant}": meaning for variant, meaning in CONTRASTIVE_MEANINGS.items()},
}


def _one_hot(index: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    # Not F.one_hot: it needs a data-dependent max() that exporters reject.
    return (torch.arange(classes, device=index.device)[None, :] == index[:, None]).to(dtype)


def _linear_bias(graph: ProbeGraph):
    node = graph.linear
    if node.op == "call_module":
        return graph.module.get_submodule(node.target).bias
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias


def _fixed_sizes(first: dict, second: dict):
    """The sizes of tensor dimensions that are the same in two runs at different batch sizes (the dimensions
    that do not follow the batch), over every node's value and the tensors inside tuple outputs."""
    for node, value in first.items():
        for a, b in zip(pytree.tree_leaves(value), pytree.tree_leaves(second.get(node))):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim():
                yield from (int(x) for x, y in zip(a.shape, b.shape) if x == y)


class ProbeModule(nn.Module):
    """forward(images in [0,1], contrast) -> {output name: tensor}.

    With ``layer_norms`` (see layer_grads.plan) it adds ``layer_grad_sqnorm`` and, for the conv weights
    left to the kernels, their taps ``tap_input_<column>`` / ``tap_grad_<column>``. With ``contrastive`` (variants
    of METHODS §4) it adds ``contrastive_<variant>``, the features r_x in closed form.
    """

    def __init__(self, graph: ProbeGraph, mean=None, std=None, layer_norms: list[ParameterNorm] | None = None,
                 confounding: str = "bce", maps=explanation_maps.MAPS, contrastive: tuple = (),
                 example: torch.Tensor | None = None, hand_rules: bool = True):
        super().__init__()
        self.contrastive = tuple(contrastive)
        self.graph_module = graph.module
        self.graph = graph
        self.maps = tuple(maps)
        self.layer_norms = list(layer_norms or [])
        self.confounding = confounding
        self.patches = nn.ModuleDict({str(column): PatchExtractor(entry.spec)
                                      for column, entry in enumerate(self.layer_norms) if entry.form == "gram"})
        mean = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(1) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1), persistent=False)
        # no Sub and Div over every input pixel where the model reads the images as they are
        self.normalizes = bool((mean != 0).any() or (std != 1).any())
        self._bias = 1.0 if _linear_bias(graph) is not None else 0.0  # a Linear without bias has no db term
        if example is None:
            raise ValueError("ProbeModule needs example images (normalised) to build its backward pass")
        env = self._example_env(example)
        graph.head.check(graph, env)
        if self.contrastive and not graph.head.rank_one:
            raise ExportError(f"contrastive features (METHODS §4) read one h for every class, (p - e_i) h^T; the "
                              f"last layer {graph.linear_name!r} is a {graph.head.describe()}, whose classes each "
                              "read their own features: export without contrastive=")
        for node in graph.network_nodes():
            if node.op == "call_module" and node.target in graph.opaque:
                check_traceable(self.graph_module, make_call(self.graph_module, node, env),
                                where(self.graph_module, node))
        cache = VJPCache()
        head = graph.head_nodes()
        # one backward to the target for the maps (only what the target's gradient needs) ...
        self.map_backward = Backward(graph, env, head, set(head) | {graph.target}, hand_rules, cache)
        # ... and one through the whole network for the per-layer norms
        self.norms = nn.ModuleDict()
        if self.layer_norms:
            network = graph.network_nodes()
            self.layer_backward = Backward(graph, env, network, set(network), hand_rules, cache)
            self._fold_rows(env)
            self._plan_generic_norms(env)
        if cache.zero:
            raise ExportError(f"{cache.zero[0]} has a zero gradient for every input (a piecewise-constant or "
                              "non-differentiable operation such as round, floor or sign) and lies on the backward "
                              "path: every map or gradient norm behind it would be degenerate"
                              + (f"; also {cache.zero[1:]}" if len(cache.zero) > 1 else ""))

    def _example_env(self, example: torch.Tensor) -> dict:
        """Every node's value on the example images, cycled to a batch size that no batch-independent dimension
        of any activation equals: the generic rule traces these values with symbolic shapes, and duck sizing
        would tie the batch to an equal dimension (feasibility.md: then the exporter silently fixes the batch).
        Dimensions that follow the batch (a ViT's permuted qkv holds it second) are told apart by a second run."""
        with torch.no_grad():
            envs = {b: self.run_graph(example[torch.arange(b) % len(example)]) for b in (7, 11)}
            fixed = frozenset(_fixed_sizes(envs[7], envs[11])) | tensor_sizes(  # and the weights' (a 7x7 kernel)
                (*self.graph_module.parameters(), *self.graph_module.buffers()))
            batch = free_batch(fixed)
            self.example_batch, self.activation_sizes = batch, fixed
            self.example_images = example[torch.arange(batch) % len(example)]
            return envs.get(batch) or self.run_graph(self.example_images)

    def _fold_rows(self, env: dict) -> None:
        """Each norm's rows per image (``_rows_per_image``). Per-sample norms of folded rows are the generic
        rule's vjp over all of an image's rows, or a per-position Linear's sum over all of an image's positions;
        the other closed forms read one row per image."""
        changed_runs, rows = {}, {}  # the graph run with one image changed, by image; rows per image, by node
        for entry in self.layer_norms:
            if entry.node is None:
                continue
            place = where(self.graph_module, entry.node)
            if entry.node not in rows:
                call = make_call(self.graph_module, entry.node, env)
                rows[entry.node] = self._rows_per_image(call, env, place, changed_runs)
            entry.rows = rows[entry.node]
            if entry.rows > 1 and entry.form != "generic" and not entry.per_position:
                raise ExportError(f"{place}: it folds {entry.rows} rows per image into its batch, and the "
                                  f"{entry.kind} norm of {entry.name!r} is not supported there")

    def _plan_generic_norms(self, env: dict) -> None:
        groups: dict = {}
        for entry in self.layer_norms:
            if entry.form == "generic":
                groups.setdefault(entry.node, []).append(entry)
        for node, entries in groups.items():
            call = make_call(self.graph_module, node, env)
            attributes = [e.attribute for e in entries if node.op != "call_module"]
            state = [e.attribute for e in entries if node.op == "call_module"]
            self.norms[node.name] = per_sample_norms(self.graph_module, call, attributes, state,
                                                     where(self.graph_module, node), self.example_batch,
                                                     entries[0].rows)

    def _rows_per_image(self, call, env: dict, place: str, changed_runs: dict) -> int:
        """How many rows of the call's batched inputs belong to one image: 1, or k where the model folds k rows
        of each image into the batch (Swin's windows, MobileViT's patches). Checked, not assumed: changing the
        first (or the last) image alone must change only its own k consecutive rows."""
        rows = batch_of(call)
        if rows is None or rows == self.example_batch:
            return 1
        folded = rows // self.example_batch
        if rows % self.example_batch:
            raise ExportError(f"{place}: its input holds {rows} rows for {self.example_batch} images, not a whole "
                              "number per image; per-sample parameter norms need each image's rows")
        for image in (0, self.example_batch - 1):
            changed = changed_runs.get(image)
            if changed is None:
                images = self.example_images.clone()
                images[image] = 1 - images[image]
                changed = changed_runs[image] = self.run_graph(images)
            own = set(range(image * folded, (image + 1) * folded))
            for node in (n for n in call.inputs if n in call.batched):
                differs = (changed[node] - env[node]).reshape(rows, -1).abs().amax(dim=1) > 0
                if not set(torch.nonzero(differs).flatten().tolist()) <= own:
                    raise ExportError(f"{place}: it folds {folded} rows per image into its batch, but not as "
                                      "each image's consecutive rows; per-sample parameter norms are not supported")
        return folded

    def output_specs(self, outputs: dict) -> list[TensorSpec]:
        """Name, dtype, shape (batch named B) and meaning of every output, from one forward's ``outputs``."""
        described = {spec.name: explanation_maps.describe(spec) for spec in self.maps}
        specs = []
        for name, value in outputs.items():
            meaning = described.get(name) or MEANINGS.get(name) or MEANINGS[name.rsplit("_", 1)[0]]
            specs.append(TensorSpec(name, str(value.dtype).replace("torch.", ""), ("B", *value.shape[1:]), meaning))
        return specs

    def run_graph(self, x: torch.Tensor) -> dict:
        """Every node's value, so the backward rules can read the saved activations."""
        interpreter = fx.Interpreter(self.graph_module, garbage_collect_values=False)
        interpreter.run(x)
        return dict(interpreter.env)


    def forward(self, images: torch.Tensor, contrast: torch.Tensor) -> dict:
        env = self.run_graph((images - self.mean) / self.std if self.normalizes else images)
        activation = self.graph.map_of(env[self.graph.target])
        logits = env[self.graph.logits]
        classes = logits.shape[1]
        terms = self.graph.head.terms(self.graph, env, bool(self._bias))

        probs = torch.softmax(logits, dim=1)
        pred = logits.argmax(dim=1)
        pred_hot = _one_hot(pred, classes, logits.dtype)
        runner_up = logits.masked_fill(pred_hot > 0, float("-inf")).argmax(dim=1)
        contrast_class = torch.where(contrast < 0, runner_up, contrast)
        contrast_hot = _one_hot(contrast_class, classes, logits.dtype)

        # METHODS §1: dCE(z, q)/dz = p - e_q, so ||grad_W||^2 + ||grad_b||^2 = sum_c (p_c - e_qc)^2 w_c with
        # w_c = ||dz_c/dW_c||^2 + ||dz_c/db_c||^2 (= ||h||^2 + 1 for every class of a Linear). The sum over
        # c != q is taken without cancellation at q = P.
        per_class = terms.weight_sqnorm + terms.bias_sqnorm
        squares = probs * probs * per_class
        others_of_pred = (squares * (1 - pred_hot)).sum(dim=1, keepdim=True)
        others = torch.where(pred_hot > 0, others_of_pred, squares.sum(dim=1, keepdim=True) - squares)
        label_grad_sqnorm = others + (1 - probs) ** 2 * per_class

        # Confounding all-ones label, BCE-with-logits summed over classes: delta = sigmoid(z) - 1.
        confounding_sq = (torch.sigmoid(logits) - 1) ** 2
        confounding = torch.stack([(confounding_sq * terms.weight_sqnorm).sum(dim=1),
                                   (confounding_sq * terms.bias_sqnorm).sum(dim=1)], dim=1)
        outputs = {"logits": logits, "probs": probs, "pred": pred, "features": terms.features,
                   "contrast_class": contrast_class, "label_grad_sqnorm": label_grad_sqnorm,
                   "confounding_grad_sqnorm": confounding}

        # METHODS §3: one backward to the target layer per distinct scalar target, shared by its maps.
        gradients = {}
        for spec in self.maps:
            if spec.target not in gradients:
                cotangent = explanation_maps.TARGETS[spec.target].logit_gradient(probs, pred_hot, contrast_hot)
                grad = self.map_backward.run(env, cotangent, self.graph.head_nodes(), keep={self.graph.target},
                                             broadcastable={self.graph.target})[self.graph.target]
                gradients[spec.target] = self.graph.map_of(grad)
            outputs[spec.name] = explanation_maps.weighted_map(spec, gradients[spec.target], activation)
        for variant in self.contrastive:  # METHODS §4: dCE(z, i)/dW = (p - e_i) h^T, no backward needed
            outputs[f"contrastive_{variant}"] = contrastive_features(variant, probs, terms.features)
        if self.layer_norms:
            outputs.update(self._layer_grads(env, logits))
        return outputs

    def _layer_grads(self, env: dict, logits: torch.Tensor) -> dict:
        """METHODS §1/§6: one batched backward of the confounding loss through the whole network."""
        owners = {entry.node for entry in self.layer_norms if entry.node is not None}
        grads = self.layer_backward.run(env, confounding_logit_grad(logits, self.confounding),
                                        self.graph.network_nodes(), keep=owners)
        columns, taps, generic = [], {}, {}
        for column, entry in enumerate(self.layer_norms):
            if entry.form == "generic":
                if entry.node not in generic:
                    call = make_call(self.graph_module, entry.node, env)
                    generic[entry.node] = iter(self.norms[entry.node.name].apply(
                        call, self._grad(grads, entry.node, env), self.graph_module).unbind(1))
                columns.append(next(generic[entry.node]))
                continue
            if entry.kind == "unused":
                columns.append(torch.zeros_like(logits[:, 0]))
                continue
            if entry.kind == "expanded":
                columns.append(expanded_sqnorm(env[entry.node.args[0]], self._grad(grads, entry.node, env)))
                continue
            x, grad = env[entry.node.args[0]], self._grad(grads, entry.node, env)
            if entry.rows > 1:  # an image's positions in all of its rows
                x, grad = per_image(x, entry.rows), per_image(grad, entry.rows)
            if entry.per_position and entry.kind == "linear_weight":
                x, grad = as_map(x), as_map(grad)
            if entry.form == "closed":
                module = self.graph_module.get_submodule(entry.node.target)
                columns.append(closed_form_sqnorm(entry, module, x, grad))
            elif entry.form == "gram":
                columns.append(gram_sqnorm(self.patches[str(column)](x), grad, entry.spec.groups))
            else:  # filled in by gradprobe.kernels from the taps
                columns.append(torch.zeros_like(logits[:, 0]))
                taps[f"tap_input_{column}"], taps[f"tap_grad_{column}"] = x, grad
        return {"layer_grad_sqnorm": torch.stack(columns, dim=1), **taps}

    @staticmethod
    def _grad(grads: dict, node, env: dict):
        """The output gradient of a call, zeros where no gradient reaches it."""
        grad = grads.get(node)
        if grad is None:
            return torch.zeros_like(env[node])
        return grad.expand_as(env[node]) if isinstance(grad, torch.Tensor) else grad


class OrderedOutputs(nn.Module):
    """The probe module with its outputs as a tuple in ``names`` order: what the ONNX exporter needs."""

    def __init__(self, probe: ProbeModule, names: list[str]):
        super().__init__()
        self.probe, self.names = probe, list(names)

    def forward(self, images: torch.Tensor, contrast: torch.Tensor):
        outputs = self.probe(images, contrast)
        return tuple(outputs[name] for name in self.names)
