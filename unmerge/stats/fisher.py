"""Diagonal Fisher: F = (1/n) Σ_i g_i², g_i = ∇_θ log p(y_i | x_i) for example i, accumulated in fp32.

Causal LMs: log p(y_i | x_i) = Σ_pos log p(y_pos | x_<pos) over the real positions; the labels y are sampled from
the model's own predictive distribution at every position given the observed context (``estimator='sampled'``, the
true Fisher) or are the observed next tokens (``'empirical'``). ``level='token'`` treats every predicted position as
its own example (n = number of predicted tokens). Sequence classifiers (``*ForSequenceClassification``): one label
per example, y ~ p(· | x) from the pooled logits (``sampled``) or the given class (``empirical``, ``labels=``).

Three paths compute the same numbers (all square per-example gradients; squaring a batch-mean gradient would be a
different, wrong estimator):

- ``hooks``: one forward + backward of the whole right-padded batch, per-example squared gradients formed layer by
  layer from captured inputs and output gradients (``unmerge.stats.fisher_hooks``); level='token' runs it on one
  row per predicted position (the prefix up to it, objective at that position only);
- ``vmap`` (causal LMs): per-example gradients with ``torch.func``;
- ``loop``: one example at a time (one position at a time for level='token'), ordinary backward.

``auto`` takes hooks when every trainable parameter sits in a supported module, else vmap while a batch of per-example
gradients stays under ``VMAP_BUDGET_BYTES``, else the loop; a path that fails on a batch hands it to the next one,
with a warning. A causal model never attends to the padding after a sequence, so causal batches need no attention
mask; classifier batches are padded with ``config.pad_token_id`` and masked.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from unmerge.errors import StatisticError
from unmerge.stats.fisher_hooks import HookPlan, HooksUnsupported

log = logging.getLogger(__name__)

ESTIMATORS = ("sampled", "empirical")
LEVELS = ("sequence", "token")
PATHS = ("auto", "hooks", "vmap", "loop")
# 'auto' takes the vmap path only when a batch of per-example gradients stays under this size. Measured with
# `unmerge bench fisher` on 2 CPU cores: 1.1-1.5x the loop for the 1M-parameter builtin model, 0.48x (and 5.7 GB)
# for a 124M-parameter GPT-2 at batch 4.
VMAP_BUDGET_BYTES = 512 * 1024**2
# hooks: per-example gradients of one parameter are formed for about this many bytes of examples at a time, so that
# they stay in cache while squared (`unmerge.stats.fisher_hooks`); a larger weight goes one example at a time
HOOKS_CHUNK_BYTES = 4 * 1024 * 1024


def _pad(batch: list[list[int]], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with ``pad_id``; returns (ids [B, L], mask [B, L] of real tokens)."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
        mask[row, : len(seq)] = True
    return ids, mask


def draw_labels(logits: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """One draw per position from softmax(logits [B, P, K]) [B, P], by inverse CDF: u ~ U[0, 1) from a generator
    seeded by ``seeds[row]`` (so a batch gives the same draws as one example at a time), y = the first class whose
    cumulative probability (float64) exceeds u."""
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum_(-1).cpu()  # (per row: the batch does not matter)
    u = torch.stack([torch.rand(cdf.shape[1], 1, generator=torch.Generator(device="cpu").manual_seed(seed),
                                dtype=torch.float64) for seed in seeds])
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1
                                                                                        ).to(logits.device)


@torch.no_grad()
def target_labels(model, ids: torch.Tensor, mask: torch.Tensor, estimator: str, seeds: list[int]) -> torch.Tensor:
    """Next-token targets [B, L-1] of a causal LM: the observed tokens, or one draw per position from
    p(· | x_<pos) (``draw_labels``); padding positions get 0."""
    if estimator == "empirical":
        return ids[:, 1:]
    return draw_labels(model(input_ids=ids).logits[:, :-1], seeds).masked_fill(~mask[:, 1:], 0)


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Objective:
    """What an example's log-likelihood is for one kind of model: logits at its predicted positions [B, P, K], the
    weight of each position [B, P] (0 at padding) and the observed targets [B, P]."""

    kind: str
    levels: tuple[str, ...]
    min_length: int
    logits: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    weights: Callable[[torch.Tensor], torch.Tensor]
    observed: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


OBJECTIVES = {
    "causal_lm": Objective(
        "causal_lm", LEVELS, 2,
        logits=lambda model, ids, mask: model(input_ids=ids).logits[:, :-1],
        weights=lambda mask: mask[:, 1:].float(),
        observed=lambda ids, given: ids[:, 1:]),
    "sequence_classification": Objective(
        "sequence_classification", ("sequence",), 1,
        logits=lambda model, ids, mask: model(input_ids=ids, attention_mask=mask.long()).logits[:, None],
        weights=lambda mask: torch.ones(mask.shape[0], 1, device=mask.device),
        observed=lambda ids, given: given[:, None]),
}


def model_kind(model: torch.nn.Module) -> str:
    """'sequence_classification' for a transformers ``*ForSequenceClassification`` model, else 'causal_lm'."""
    from unmerge.stats.gram import is_sequence_classifier  # (gram imports this module)

    return "sequence_classification" if is_sequence_classifier(model) else "causal_lm"


@dataclass
class _Batch:
    ids: torch.Tensor       # [B, L] right-padded
    mask: torch.Tensor      # [B, L] real tokens
    weights: torch.Tensor   # [B, P] 1 at the predicted positions
    seeds: list[int]
    given: torch.Tensor | None  # observed class labels [B] (classifiers)
    targets: torch.Tensor | None = None  # [B, P], filled by ``targets_of``


def targets_of(model, objective: Objective, batch: _Batch, estimator: str) -> torch.Tensor:
    """The batch's targets [B, P] (one extra no-grad forward for sampled labels), cached on the batch."""
    if batch.targets is None:
        if estimator == "empirical":
            batch.targets = objective.observed(batch.ids, batch.given)
        else:
            with torch.no_grad():
                draws = draw_labels(objective.logits(model, batch.ids, batch.mask), batch.seeds)
            batch.targets = draws.masked_fill(batch.weights == 0, 0)
    return batch.targets


class FisherAccumulator:
    """Running Σ g² per parameter (fp32) and the example count."""

    def __init__(self, named: dict[str, torch.Tensor]):
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
        self.count = 0

    def add_squares(self, name: str, squares: torch.Tensor) -> None:
        self.sums[name] += squares

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise StatisticError("no examples reached the Fisher estimator", "give a non-empty dataset")
        return {name: (total / self.count).cpu() for name, total in self.sums.items()}


Squares = tuple[dict[str, torch.Tensor], int]


def _loop_squares(model, objective: Objective, params: dict[str, torch.nn.Parameter], batch: _Batch, level: str,
                  estimator: str, plan: HookPlan | None) -> Squares:
    """One example at a time (and one position at a time for level='token'): ordinary backward passes."""
    targets = targets_of(model, objective, batch, estimator)
    squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for row in range(batch.ids.shape[0]):
        length = int(batch.mask[row].sum())
        n_pred = int(batch.weights[row].sum())
        logits = objective.logits(model, batch.ids[row : row + 1, :length], batch.mask[row : row + 1, :length])
        logp = _token_logprobs(logits[0, :n_pred], targets[row, :n_pred])
        per_example = [logp.sum()] if level == "sequence" else list(logp)
        for k, target in enumerate(per_example):
            grads = torch.autograd.grad(target, list(params.values()), retain_graph=k + 1 < len(per_example),
                                        allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    squares[name] += g.float() ** 2
            count += 1
    return squares, count


def _vmap_squares(model, objective: Objective, params: dict[str, torch.nn.Parameter], batch: _Batch, level: str,
                  estimator: str, plan: HookPlan | None) -> Squares:
    """Per-example (or per-position) gradients with torch.func; padding positions get zero weight."""
    if objective.kind != "causal_lm":
        raise HooksUnsupported("the vmap path handles causal LMs only")
    targets = targets_of(model, objective, batch, estimator)
    detached = {n: p.detach() for n, p in params.items()}
    buffers = dict(model.named_buffers())

    def weighted_logprob(p, seq, lab, weight):
        logits = functional_call(model, (p, buffers), (seq.unsqueeze(0),)).logits[0, :-1]
        return (_token_logprobs(logits, lab) * weight).sum()

    per_grad = grad(weighted_logprob)
    squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    pad_id = model.config.pad_token_id
    model.config.pad_token_id = None  # else HF inspects the ids for padding: data-dependent control flow under vmap
    try:
        with warnings.catch_warnings():  # torch notes that SDPA has no batching rule; measured no faster with eager
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            if level == "sequence":
                grads = vmap(per_grad, in_dims=(None, 0, 0, 0))(detached, batch.ids, targets, batch.weights)
                for name, g in grads.items():
                    squares[name] += (g.float() ** 2).sum(0)
                return squares, batch.ids.shape[0]
            over_positions = vmap(per_grad, in_dims=(None, None, None, 0))
            count = 0
            for row in range(batch.ids.shape[0]):
                n_pos = int(batch.weights[row].sum())
                eye = torch.eye(batch.weights.shape[1], device=batch.ids.device)[:n_pos]
                for name, g in over_positions(detached, batch.ids[row], targets[row], eye).items():
                    squares[name] += (g.float() ** 2).sum(0)
                count += n_pos
            return squares, count
    finally:
        model.config.pad_token_id = pad_id


def _hooks_squares(model, objective: Objective, params: dict[str, torch.nn.Parameter], batch: _Batch, level: str,
                   estimator: str, plan: HookPlan | None) -> Squares:
    """One batched backward per group of rows; sampled sequence-level labels are drawn from that same forward."""
    if plan is None:
        raise HooksUnsupported("no hook plan for this model")
    if level == "sequence":
        def run() -> torch.Tensor:
            logits = objective.logits(model, batch.ids, batch.mask)
            if batch.targets is None and estimator == "sampled":
                batch.targets = draw_labels(logits, batch.seeds).masked_fill(batch.weights == 0, 0)
            targets = targets_of(model, objective, batch, estimator)
            return (_token_logprobs(logits, targets) * batch.weights).sum()

        return plan.squares(run, batch.ids.shape[0], HOOKS_CHUNK_BYTES), batch.ids.shape[0]
    targets = targets_of(model, objective, batch, estimator)
    squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    groups = _position_rows(batch.weights, token_budget=batch.ids.numel())
    for rows, positions in groups:
        width = int(positions.max()) + 2
        ids, mask = batch.ids[rows, :width], batch.mask[rows, :width]
        one_hot = torch.zeros(len(rows), width - 1, device=ids.device)
        one_hot[torch.arange(len(rows)), positions] = 1.0
        row_targets = targets[rows, : width - 1]

        def run(ids=ids, mask=mask, one_hot=one_hot, row_targets=row_targets) -> torch.Tensor:
            return (_token_logprobs(objective.logits(model, ids, mask), row_targets) * one_hot).sum()

        for name, total in plan.squares(run, len(rows), HOOKS_CHUNK_BYTES).items():
            squares[name] += total
    return squares, sum(len(rows) for rows, _ in groups)


def _position_rows(weights: torch.Tensor, token_budget: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """level='token' rows: (example index, position) for every predicted position, in groups whose padded prefixes
    (position + 2 tokens each) hold about ``token_budget`` tokens."""
    pairs = weights.nonzero().tolist()
    groups, current, tokens = [], [], 0
    for example, position in pairs:
        if current and tokens + position + 2 > token_budget:
            groups.append(current)
            current, tokens = [], 0
        current.append((example, position))
        tokens += position + 2
    groups.append(current)
    device = weights.device
    return [(torch.tensor([e for e, _ in g], device=device), torch.tensor([p for _, p in g], device=device))
            for g in groups]


PATH_FUNCTIONS: dict[str, Callable[..., Squares]] = {"hooks": _hooks_squares, "vmap": _vmap_squares,
                                                     "loop": _loop_squares}
# what a failing path raises when it does not apply to a model (anything else is a real error)
NOT_APPLICABLE = (HooksUnsupported, RuntimeError, NotImplementedError, TypeError)


def _candidates(path: str, objective: Objective, params: dict[str, torch.nn.Parameter], batch_size: int) -> list[str]:
    """Paths to try, in order."""
    if path != "auto":
        return [path]
    order = ["hooks"]
    per_example_bytes = 4 * sum(p.numel() for p in params.values())
    if objective.kind == "causal_lm" and per_example_bytes * batch_size <= VMAP_BUDGET_BYTES:
        order.append("vmap")  # vmap holds one gradient per example: measured slower than the loop at 124M parameters
    return order + ["loop"]


def _given_labels(labels: list[int] | None, objective: Objective, estimator: str) -> None:
    if objective.kind == "causal_lm":
        if labels is not None:
            raise StatisticError("labels= applies to sequence-classification models only",
                                 "a causal LM's labels are its next tokens (estimator='empirical')")
        return
    if estimator == "empirical" and labels is None:
        raise StatisticError("the empirical Fisher of a sequence classifier needs the observed labels",
                             "pass labels=[class index per example] (a 'label' column), or use estimator='sampled'")


def diagonal_fisher(
    model: torch.nn.Module,
    examples: list[list[int]],
    *,
    estimator: str = "sampled",
    level: str = "sequence",
    batch_size: int = 8,
    seed: int = 0,
    path: str = "auto",
    progress: bool = True,
    offset: int = 0,
    labels: list[int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean per-example squared gradients of the log-likelihood, keyed by parameter name (a tied parameter once).

    ``path``: 'auto', 'hooks', 'vmap' or 'loop' (module docstring). ``labels``: the class index of every example,
    for sequence classifiers (required by estimator='empirical'). Returns (fisher, info) where info records the
    path used (and why an earlier one was left, ``fallback``), the model kind and the example count n.
    ``offset``: the global index of ``examples[0]`` when this is one shard of a data-parallel run
    (``unmerge.stats.distributed``); it enters the per-example label seeds only.
    """
    for value, allowed, what in ((estimator, ESTIMATORS, "estimator"), (level, LEVELS, "level"),
                                 (path, PATHS, "path")):
        if value not in allowed:
            raise StatisticError(f"unknown Fisher {what} '{value}'", f"use one of {', '.join(allowed)}")
    objective = OBJECTIVES[model_kind(model)]
    if level not in objective.levels:
        raise StatisticError(f"Fisher level '{level}' does not apply to a {objective.kind} model",
                             f"use level {' or '.join(objective.levels)}")
    if path == "vmap" and objective.kind != "causal_lm":
        raise StatisticError("the vmap Fisher path handles causal LMs only", "use path hooks, loop or auto")
    _given_labels(labels, objective, estimator)
    if not examples:
        raise StatisticError("the Fisher dataset is empty", "give at least one example")
    if labels is not None and len(labels) != len(examples):
        raise StatisticError(f"{len(labels)} labels for {len(examples)} examples", "give one label per example")
    keep = [i for i, e in enumerate(examples) if len(e) >= objective.min_length]
    if not keep:
        raise StatisticError(f"every example is shorter than {objective.min_length} tokens; nothing to predict")
    examples = [examples[i] for i in keep]
    labels = [int(labels[i]) for i in keep] if labels is not None else None
    pad_id = 0
    if objective.kind == "sequence_classification":
        from unmerge.stats.gram import classifier_pad_id

        pad_id = classifier_pad_id(model)
        _check_classes(labels, int(model.config.num_labels))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = FisherAccumulator(params)
    order = _candidates(path, objective, params, batch_size)
    plan, fallback = None, None
    if "hooks" in order:
        try:
            plan = HookPlan.build(model, params)
        except HooksUnsupported as exc:
            if path == "hooks":
                raise StatisticError(f"the hooks Fisher path does not apply: {exc}", "use path auto or loop") from exc
            fallback = f"hooks: {exc}"
            log.info("hooks Fisher path unavailable (%s); using %s", exc, order[1])
            order.remove("hooks")
    # batches of similar lengths pad less; every example keeps the seed of its own index, so the order is free
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    bar = tqdm(total=len(examples), desc=f"fisher:{estimator}", disable=not progress, unit="ex")
    for start in range(0, len(examples), batch_size):
        chunk = by_length[start : start + batch_size]
        ids, mask = _pad([examples[i] for i in chunk], device, pad_id)
        given = torch.tensor([labels[i] for i in chunk], device=device) if labels is not None else None
        batch = _Batch(ids, mask, objective.weights(mask), [seed * 1_000_003 + offset + i for i in chunk], given)
        while True:
            try:
                squares, count = PATH_FUNCTIONS[order[0]](model, objective, params, batch, level, estimator, plan)
                break
            except NOT_APPLICABLE as exc:
                if len(order) == 1:
                    if isinstance(exc, HooksUnsupported):
                        raise StatisticError(f"the {order[0]} Fisher path does not apply: {exc}",
                                             "use path auto or loop") from exc
                    raise
                fallback = f"{order[0]}: {exc}"
                log.warning("%s Fisher path unavailable for this model (%s); using %s", order[0], exc, order[1])
                order.pop(0)
        for name, total in squares.items():
            acc.add_squares(name, total)
        acc.count += count
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    info = {"path": order[0], "n_examples": acc.count, "estimator": estimator, "level": level,
            "batch_size": batch_size, "seed": seed, "model_kind": objective.kind}
    if fallback:
        info["fallback"] = fallback
    return acc.mean(), info


def _check_classes(labels: list[int] | None, n_classes: int) -> None:
    bad = [i for i, y in enumerate(labels or []) if not 0 <= y < n_classes]
    if bad:
        raise StatisticError(f"label {labels[bad[0]]} of example {bad[0]} is not a class of the model "
                             f"(num_labels = {n_classes})", "labels are 0-based class indices")
