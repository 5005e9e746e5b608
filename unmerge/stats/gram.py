"""Per-linear-layer input statistics: the Gram matrix E[x xᵀ] of RegMean, over the non-padding tokens.

Which layers: every ``nn.Linear`` and GPT-2 ``Conv1D`` of the model, except an output embedding (``lm_head``) tied to
the input embedding (it is merged as the embedding, never as a linear layer). The two layer types store their
weight differently, and that is recorded per layer because a square weight cannot tell its orientation:

- ``nn.Linear``: y = x Wᵀ + b, W is [out, in]  → ``weight_layout: out_in`` (the input axis of W is 1);
- ``Conv1D``:    y = x W + b,  W is [in, out]  → ``weight_layout: in_out`` (the input axis of W is 0).

Naming convention (statistics keyed per layer, not per parameter): for a layer whose weight is ``<module>.weight``
a per-layer statistic stores ``<module>.<factor>``: ``<module>.gram`` (Gram, [in, in]) and ``<module>.A`` /
``<module>.G`` (K-FAC, see ``unmerge.stats.kfac``). ``layer_stat_names`` maps a parameter name to the tensors of a
statistic kind; the merge engine uses it to hand a method ``task.stats['gram']`` or ``task.stats['kfac.A']`` /
``task.stats['kfac.G']`` for the weight of each layer (nothing for biases, norms and embeddings). The statistic's
metadata lists every layer under ``layers`` ({module: {type, weight_layout, in_features, out_features, bias}}); the
engine passes the weight's entry to the method as ``task.context['layer']``.

Sequence-classification models (``*ForSequenceClassification``): the Gram needs only the inputs, so it is the same
statistic over the same tokens; batches are padded with ``config.pad_token_id`` (the classifier pools the rightmost
non-padding token) and the classification head (``score``) is a linear layer like any other (a multi-task merge
keeps only the shared body's layers).

Numerics: inputs are cast to fp32, each batch's XᵀX is formed in fp32 and accumulated in fp64, and the mean is
stored in fp32. Padding is masked: only the tokens of the examples contribute, whatever the batch size.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from unmerge.errors import StatisticError
from unmerge.stats.fisher import _pad as pad_batch

# statistic kind -> the factors stored per layer as ``<module>.<factor>``
LAYER_STAT_FACTORS: dict[str, tuple[str, ...]] = {"gram": ("gram",), "kfac": ("A", "G")}
WEIGHT_SUFFIX = ".weight"


def layer_stat_names(kind: str, name: str) -> dict[str, str]:
    """{key in ``task.stats``: tensor name in the statistic} for parameter ``name``.

    Per-parameter statistics (Fisher) are keyed by the parameter's own name. Per-layer ones exist for weights only:
    ``gram`` → {'gram': '<module>.gram'}, ``kfac`` → {'kfac.A': '<module>.A', 'kfac.G': '<module>.G'}."""
    factors = LAYER_STAT_FACTORS.get(kind)
    if factors is None:
        return {kind: name}
    if not name.endswith(WEIGHT_SUFFIX):
        return {}
    module = name[: -len(WEIGHT_SUFFIX)]
    if len(factors) == 1:
        return {kind: f"{module}.{factors[0]}"}
    return {f"{kind}.{factor}": f"{module}.{factor}" for factor in factors}


def module_of(name: str) -> str:
    """The module of a parameter (``a.b.weight`` → ``a.b``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class LinearLayer:
    """One linear layer: its module, how its weight is laid out, and its sizes."""

    name: str
    module: torch.nn.Module
    layout: str  # 'out_in' (nn.Linear) or 'in_out' (Conv1D)
    in_features: int
    out_features: int
    bias: bool

    def describe(self) -> dict:
        return {"type": type(self.module).__name__, "weight_layout": self.layout, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias}


def linear_layers(model: torch.nn.Module) -> tuple[dict[str, LinearLayer], dict[str, str]]:
    """(layers by module name, skipped modules with the reason). A tied output embedding is skipped."""
    from transformers.pytorch_utils import Conv1D

    tied: dict[int, str] = {}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inp = get_in() if callable(get_in) else None
    out = get_out() if callable(get_out) else None
    if inp is not None and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0):
        tied[id(out)] = "output embedding tied to the input embedding"
    layers: dict[str, LinearLayer] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layout, n_in, n_out = "out_in", module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            layout, (n_in, n_out) = "in_out", module.weight.shape
        else:
            continue
        if id(module) in tied:
            skipped[name] = tied[id(module)]
            continue
        layers[name] = LinearLayer(name, module, layout, int(n_in), int(n_out), module.bias is not None)
    if not layers:
        raise StatisticError("the model has no nn.Linear or Conv1D layer",
                             "Gram and K-FAC statistics need linear layers")
    return layers, skipped


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    """A transformers ``*ForSequenceClassification`` model (one label per sequence, logits [B, n_labels])."""
    return type(model).__name__.endswith("ForSequenceClassification")


def classifier_pad_id(model: torch.nn.Module) -> int:
    """The pad id a sequence classifier pools by; batches of several examples need one."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise StatisticError(f"the sequence classifier {type(model).__name__} has no config.pad_token_id",
                             "set model.config.pad_token_id (e.g. to the tokenizer's pad or eos id)")
    return int(pad)


def check_examples(examples: list[list[int]]) -> list[list[int]]:
    examples = [e for e in examples if len(e) >= 1]
    if not examples:
        raise StatisticError("the dataset is empty", "give at least one example")
    return examples


def token_rows(tensor: torch.Tensor, mask: torch.Tensor, layer: str) -> torch.Tensor:
    """The rows of a layer input/output [B, L, d] at the real tokens, as fp32 [n_tokens, d]."""
    if tensor.shape[:-1].numel() != mask.numel():
        raise StatisticError(f"layer '{layer}' sees {tensor.shape[:-1].numel()} rows for {mask.numel()} token "
                             "positions", "per-layer statistics need layers applied to every token (no routing)")
    return tensor.reshape(mask.numel(), tensor.shape[-1])[mask.reshape(-1)].float()


class InputGrams:
    """Forward hooks accumulating, per layer, Σ x xᵀ and Σ x (fp64) and the token count over masked tokens.

    Set ``mask`` before each forward; hooks only record while ``active``. With ``keep_outputs`` the layer outputs of
    the last forward are kept (for K-FAC's output gradients)."""

    def __init__(self, layers: dict[str, LinearLayer], keep_outputs: bool = False):
        self.layers = layers
        self.keep_outputs = keep_outputs
        self.mask: torch.Tensor | None = None
        self.active = False
        self.xx: dict[str, torch.Tensor] = {}
        self.x: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {name: 0 for name in layers}
        self.outputs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (layer, output, mask)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active:
                return
            rows = token_rows(inputs[0].detach(), self.mask, name)
            product = (rows.T @ rows).double()
            if name in self.xx:
                self.xx[name] += product
                self.x[name] += rows.sum(0, dtype=torch.float64)
            else:
                self.xx[name] = product
                self.x[name] = rows.sum(0, dtype=torch.float64)
            self.count[name] += rows.shape[0]
            if self.keep_outputs:
                self.outputs.append((name, output, self.mask))
        return hook

    @contextmanager
    def attached(self) -> Iterator["InputGrams"]:
        handles = [layer.module.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _counted(self, name: str) -> int:
        if self.count[name] == 0:
            raise StatisticError(f"no token reached layer '{name}'", "give a non-empty dataset")
        return self.count[name]

    def gram(self, name: str) -> torch.Tensor:
        """E[x xᵀ] (fp64)."""
        return self.xx[name] / self._counted(name)

    def augmented(self, name: str) -> torch.Tensor:
        """E[x̄ x̄ᵀ] with x̄ = [x, 1] (fp64): the Gram bordered by E[x] and 1."""
        n = self._counted(name)
        d = self.xx[name].shape[0]
        out = torch.empty(d + 1, d + 1, dtype=torch.float64, device=self.xx[name].device)
        out[:d, :d] = self.xx[name] / n
        out[:d, d] = out[d, :d] = self.x[name] / n
        out[d, d] = 1.0
        return out


def gram_statistics(model: torch.nn.Module, examples: list[list[int]], *, batch_size: int = 8,
                    progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Input Gram E[x xᵀ] of every linear layer over the non-padding tokens of ``examples`` (token-id lists).

    Returns ({'<module>.gram': [in, in] fp32}, info) where info records n_tokens, n_examples and the layers."""
    examples = check_examples(examples)
    layers, skipped = linear_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grams = InputGrams(layers)
    classifier = is_sequence_classifier(model)
    pad_id = classifier_pad_id(model) if classifier else 0
    n_tokens = 0
    with grams.attached(), torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="gram", disable=not progress, unit="batch"):
            ids, mask = pad_batch(examples[start : start + batch_size], device, pad_id)
            grams.mask, grams.active = mask, True
            model(input_ids=ids, attention_mask=mask.long())
            grams.active = False
            n_tokens += int(mask.sum())
    model.train(was_training)
    tensors = {f"{name}.gram": grams.gram(name).float().cpu() for name in layers}
    info = {"n_examples": len(examples), "n_tokens": n_tokens, "batch_size": batch_size,
            "layers": {name: layer.describe() for name, layer in layers.items()}, "skipped_layers": skipped,
            "keyed_by": "module", "factors": list(LAYER_STAT_FACTORS["gram"]), "accumulation": "float64",
            "model_kind": "sequence_classification" if classifier else "causal_lm"}
    return tensors, info
