"""The multi-task merging recipe (``kind: merge``) as a graph of cached stages:

    base ─┬─ body:base ───────────────────────────────────────────────┐
          ├─ train:<task> (one classifier per task) ─ stats:<kind>:<task> ─┴─ merge:<candidate> ─┐
          ├─ train:multitask (one body, a head per task)                                      ├─ eval ─ report
          └─ stats:base_fisher (the base LM's Fisher: H₀ of ``uncertainty``) ─────────────────────┘

Protocol (Matena & Raffel 2022; Daheim et al. 2024, for tasks with different label spaces): every task model is the
shared base body fine-tuned with a fresh head of its own; a merge merges the bodies only (the heads have different
shapes), and task t is evaluated with the merged body and task t's own head. References: ``base`` (the base body
with each task's head), ``individual`` (each task's own model on its task) and ``multitask`` (one body trained on
all tasks jointly, with its own heads). Statistics of task t are those of its classifier (body + head t) on its
training texts, kept for the body tensors and recorded for the body checkpoint; ``uncertainty``'s H₀ is the base
language model's own Fisher (its pre-training objective) on ``stats.base_fisher.data`` with N₀ =
``stats.base_fisher.n``. Embeddings and position embeddings never go through the linear-layer solvers: regmean
averages them, mats keeps its initialization, and each merged tensor's rule is in its ``merge_info.json``.

Every stage output is content-addressed (configuration + upstream keys, data by fingerprint) under
``$UNMERGE_CACHE/runs``, written atomically and locked, so an interrupted run resumes.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unmerge.cache import StageCache, default_cache_dir, stage_key
from unmerge.checkpoint import Checkpoint, write_json_atomic
from unmerge.checkpoint.writer import check_output_location
from unmerge.engine import checkpoint_hash, merge_checkpoints, required_stats, resolve_device
from unmerge.errors import RecipeError, did_you_mean
from unmerge.methods import get_method
from unmerge.methods.params import ParamPlan
from unmerge.multitask.tasks import TaskSplits, build_task
from unmerge.recipe import ANY, check_keys, fill_defaults, load_yaml_data, report_run, selection_rule
from unmerge.report.selection import parse_rule
from unmerge.stats import Statistic
from unmerge.stats.compute import EstimationRun, layer_parameter, store_statistic
from unmerge.stats.fisher import diagonal_fisher
from unmerge.stats.gram import LAYER_STAT_FACTORS, gram_statistics
from unmerge.stats.kfac import kfac_factors
from unmerge.text import fingerprint_texts
from unmerge.train import FinetuneConfig
from unmerge.train.classifier import BODY_DIR, base_body, head_file, load_classifier, train_classifier
from unmerge.workflow import PlanStep, execute_steps, source_key

log = logging.getLogger(__name__)

KIND = "merge"
SCHEMA: dict[str, Any] = {
    "kind": KIND,
    "name": "merge",
    "description": "",
    "seed": 0,
    "base_model": ANY,
    "tasks": ANY,
    "train": {"epochs": 3.0, "max_steps": -1, "learning_rate": 3e-3, "batch_size": 16, "max_length": 32,
              "weight_decay": 0.0, "warmup": 0.1},
    "stats": {"examples": 200, "estimator": "sampled", "batch_size": 16,
              "base_fisher": {"data": "builtin:clean-demo", "examples": 200, "n": None, "max_length": 64}},
    "merge": {"methods": ["task_arithmetic"], "alpha": [0.3, 0.5, 1.0], "sweep": None, "params": None},  # free-form
    "evaluate": {"batch_size": 64, "n_boot": 1000},
    "select": {"maximize": "accuracy.average", "subject_to": None},
    "report": {"dir": None, "title": None, "caveats": [], "compress_samples": False, "alpha_curves": None},
}
REFERENCES = ("base", "individual", "multitask")
# per-task statistics of a sequence classifier: kind -> (model, examples, labels, **options) -> (tensors, info)
STATISTICS = {
    "fisher": lambda model, examples, labels, **kw: diagonal_fisher(model, examples, labels=labels, **kw),
    "gram": lambda model, examples, labels, *, batch_size, progress, **_: gram_statistics(
        model, examples, batch_size=batch_size, progress=progress),
    "kfac": lambda model, examples, labels, **kw: kfac_factors(model, examples, labels=labels, **kw),
}
STAT_KINDS = tuple(STATISTICS)


@dataclass
class MergeSpec:
    """One merge candidate: a method with fixed parameters, optionally at one α of a sweep, on some tasks."""

    label: str
    method: str
    params: dict[str, Any]
    tasks: list[str]
    alpha: float | None = None


def _methods(recipe: dict[str, Any], task_names: list[str]) -> list[MergeSpec]:
    """The merge candidates of ``recipe['merge']``: each entry a method name or ``{method, label, params, pairs}``;
    a method in ``sweep`` (method → the parameter α sets) becomes one candidate per α; ``pairs: true`` merges every
    pair of tasks (for two-model methods such as slerp)."""
    merge = recipe["merge"]
    params_all = merge.get("params") or {}
    sweep = merge.get("sweep") or {}
    out: list[MergeSpec] = []
    for entry in merge["methods"]:
        entry = {"method": entry} if isinstance(entry, str) else dict(entry)
        unknown = set(entry) - {"method", "label", "params", "pairs"}
        if unknown:
            raise RecipeError(f"unknown key '{sorted(unknown)[0]}' in merge.methods entry {entry!r}",
                              "an entry is a method name or {method, label, params, pairs}")
        method = get_method(entry["method"])
        label = entry.get("label") or method.name
        params = {**params_all.get(label, {}), **(entry.get("params") or {})}
        groups = [list(p) for p in itertools.combinations(task_names, 2)] if entry.get("pairs") else [task_names]
        for tasks in groups:
            name = label if len(groups) == 1 else f"{label}[{'+'.join(tasks)}]"
            if label in sweep or method.name in sweep:
                param = method.param(sweep.get(label, sweep.get(method.name))).name
                out += [MergeSpec(name, method.name, {**params, param: float(a)}, tasks, float(a))
                        for a in merge["alpha"]]
            else:
                out.append(MergeSpec(name, method.name, params, tasks))
    labels = [(m.label, m.alpha) for m in out]
    if len(set(labels)) != len(labels):
        raise RecipeError("two merge candidates have the same label", "give one of them a 'label'")
    return out


class MultiTaskRun:
    """Plans and executes one ``kind: merge`` recipe."""

    def __init__(self, recipe: str | Path | dict, *, out: str | Path | None = None, seed: int | None = None,
                 device: str = "auto", cache_dir: str | Path | None = None, progress: bool = True,
                 overwrite: bool = True):
        where = "recipe" if isinstance(recipe, dict) else str(recipe)
        given = dict(recipe) if isinstance(recipe, dict) else load_yaml_data(Path(recipe), "recipe")
        if not isinstance(given, dict):
            raise RecipeError(f"recipe '{where}' must be a mapping at the top level")
        check_keys(given, SCHEMA, (), where)
        self.given = given
        self.recipe = fill_defaults(given, SCHEMA, ())
        for key in ("params", "sweep"):
            self.recipe["merge"][key] = self.recipe["merge"][key] or {}
        if seed is not None:
            self.recipe["seed"] = seed
        self.out = Path(out or self.recipe["report"]["dir"] or f"reports/{self.recipe['name']}")
        self.recipe["report"]["dir"] = str(self.out)
        self.device, self.progress, self.overwrite = device, progress, overwrite
        self.cache = StageCache(cache_dir or default_cache_dir() / "runs")
        self.timings: dict[str, float] = {}
        self.inputs: dict[str, Any] = {}
        tasks = self.recipe["tasks"]
        if not isinstance(tasks, dict) or not tasks:
            raise RecipeError(f"recipe '{where}': tasks must map task names to task specs",
                              "see recipes/merge-topics.yaml")
        self.task_names = [str(t) for t in tasks]
        self.merges = _methods(self.recipe, self.task_names)
        self._validate()
        self._splits: dict[str, TaskSplits] | None = None
        self._tok = None

    # -- validation and data -------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for m in self.merges:  # every parameter value as the merge checks it, before any stage runs
            ParamPlan.build(get_method(m.method), m.params, [{} for _ in m.tasks])
        rule = self.selection_rule()
        if rule:
            parse_rule(rule)
        if self.recipe["stats"]["estimator"] not in ("sampled", "empirical"):
            est = self.recipe["stats"]["estimator"]
            raise RecipeError(f"stats.estimator is '{est}'", did_you_mean(est, ["sampled", "empirical"]))

    def selection_rule(self) -> dict[str, Any] | None:
        return selection_rule(self.recipe)

    @property
    def splits(self) -> dict[str, TaskSplits]:
        if self._splits is None:
            self._splits = {name: build_task(name, spec) for name, spec in self.recipe["tasks"].items()}
            for name, split in self._splits.items():
                for part in ("train", "test"):
                    task = getattr(split, part)
                    self.inputs[f"data:{name}:{part}"] = self.data_fingerprint(task)
        return self._splits

    @staticmethod
    def data_fingerprint(task) -> str:
        return fingerprint_texts([json.dumps([t, y]) for t, y in zip(task.texts, task.labels)])

    def needed_stats(self) -> set[str]:
        kinds: set[str] = set()
        for m in self.merges:
            kinds |= set(required_stats(get_method(m.method), m.params))
        return kinds

    # -- the plan ------------------------------------------------------------------------------------------------
    def plan(self) -> list[PlanStep]:
        r = self.recipe
        seed = r["seed"]
        base_id = source_key(r["base_model"])
        train_cfg = r["train"]
        self.body_base = self.cache.path("body", stage_key("body", {"base": base_id}))
        steps = [PlanStep("body", "base body", self.body_base, lambda: base_body(self.base_dir(), self.body_base,
                                                                                 overwrite=True))]
        data = {t: self.data_fingerprint(self.splits[t].train) for t in self.task_names}
        self.trained: dict[str, Path] = {}
        train_keys: dict[str, str] = {}
        for group in [[t] for t in self.task_names] + [self.task_names]:
            name = group[0] if len(group) == 1 else "multitask"
            key = stage_key("classifier", {"base": base_id, "tasks": {t: data[t] for t in group}, "cfg": train_cfg,
                                           "seed": seed})
            train_keys[name], self.trained[name] = key, self.cache.path("classifier", key)
            steps.append(PlanStep(f"train:{name}", f"train a classifier on {', '.join(group)}", self.trained[name],
                                  lambda g=group, o=self.trained[name]: self._train(g, o)))
        kinds = self.needed_stats()
        self.stat_dirs: dict[tuple[str, str], Path] = {}
        stats_cfg = {k: v for k, v in r["stats"].items() if k != "base_fisher"}
        for kind in sorted(kinds & set(STAT_KINDS)):
            for task in self.task_names:
                key = stage_key("stats", {"kind": kind, "model": train_keys[task], "data": data[task],
                                          "cfg": stats_cfg, "seed": seed, "max_length": train_cfg["max_length"]})
                out = self.cache.path(f"stats-{kind}", key)
                self.stat_dirs[(kind, task)] = out
                steps.append(PlanStep(f"stats:{kind}", f"{kind} of the {task} classifier", out,
                                      lambda k=kind, t=task, o=out: self._statistic(k, t, o)))
        if "base_fisher" in kinds:
            cfg = r["stats"]["base_fisher"]
            key = stage_key("stats", {"kind": "base_fisher", "base": base_id, "data": source_key(cfg["data"]),
                                      "cfg": cfg, "estimator": r["stats"]["estimator"], "seed": seed})
            out = self.cache.path("stats-base-fisher", key)
            self.stat_dirs[("base_fisher", "")] = out
            steps.append(PlanStep("stats:base_fisher", f"Fisher of the base LM on {cfg['data']}", out,
                                  lambda o=out: self._base_fisher(o)))
        self.candidates: list[dict[str, Any]] = [
            {"name": "base", "method": None, "alpha": None, "body": {t: self.body_base for t in self.task_names},
             "heads": dict(self.trained_heads()), "key": base_id},
            {"name": "individual", "method": None, "alpha": None,
             "body": {t: self.trained[t] / BODY_DIR for t in self.task_names}, "heads": dict(self.trained_heads()),
             "key": json.dumps([train_keys[t] for t in self.task_names])},
            {"name": "multitask", "method": None, "alpha": None,
             "body": {t: self.trained["multitask"] / BODY_DIR for t in self.task_names},
             "heads": {t: self.trained["multitask"] for t in self.task_names}, "key": train_keys["multitask"]},
        ]
        for m in self.merges:
            stat_keys = {k: [self.stat_dirs[(k, t)].name for t in m.tasks] for k in STAT_KINDS
                         if (k, m.tasks[0]) in self.stat_dirs}
            key = stage_key("merge", {"method": m.method, "params": m.params, "models": [train_keys[t] for t in m.tasks],
                                      "base": base_id, "stats": stat_keys,
                                      "base_fisher": self.stat_dirs.get(("base_fisher", ""), Path()).name})
            out = self.cache.path("merge", key)
            name = m.label if m.alpha is None else f"{m.label}@{m.alpha:g}"
            self.candidates.append({"name": name, "method": m.label, "alpha": m.alpha,
                                    "body": {t: out for t in self.task_names}, "heads": dict(self.trained_heads()),
                                    "key": key, "merge": m})
            steps.append(PlanStep("merge", f"{name} on {', '.join(m.tasks)}", out, lambda s=m, o=out: self._merge(s, o)))
        for cand in self.candidates:
            spec = {"model": cand["key"], "heads": {t: str(h.name) for t, h in cand["heads"].items()},
                    "test": {t: self.data_fingerprint(self.splits[t].test) for t in self.task_names},
                    "cfg": r["evaluate"], "max_length": train_cfg["max_length"], "seed": seed}
            cand["eval"] = self.cache.path("eval-cls", stage_key("eval-cls", spec), ".json")
            steps.append(PlanStep("evaluate", f"evaluate {cand['name']}", cand["eval"],
                                  lambda c=cand: self._evaluate(c)))
        return steps

    def trained_heads(self):
        return ((t, self.trained[t]) for t in self.task_names)

    # -- stage bodies --------------------------------------------------------------------------------------------
    def base_dir(self) -> Path:
        from unmerge.models import resolve_model

        return resolve_model(self.recipe["base_model"])

    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.base_dir())
        return self._tok

    def _pad_id(self) -> int:
        from unmerge.evaluation.common import pad_token_id

        return pad_token_id(self._tokenizer())

    def _train(self, group: list[str], out: Path) -> None:
        cfg = dict(self.recipe["train"])
        max_length = cfg.pop("max_length")
        train_classifier(self.base_dir(), [self.splits[t].train for t in group], out,
                         FinetuneConfig(**cfg, max_length=max_length, seed=self.recipe["seed"]),
                         max_length=max_length, device=self.device, progress=self.progress, overwrite=True)

    def _statistic(self, kind: str, task: str, out: Path) -> None:
        """Statistic ``kind`` of task ``task``'s classifier (body + its head) on its training texts, kept for the body
        tensors and recorded for the body checkpoint (``model_hash``), with N = the task's training-set size."""
        from unmerge.evaluation.accuracy import encode_for_classification

        cfg = self.recipe["stats"]
        body, head = self.trained[task] / BODY_DIR, head_file(self.trained[task], task)
        pad, device = self._pad_id(), resolve_device(self.device)
        model = load_classifier(body, head, pad_id=pad, device=str(device))
        train = self.splits[task].train
        texts, labels = train.texts[: cfg["examples"]], train.labels[: cfg["examples"]]
        max_length = self.recipe["train"]["max_length"]
        examples = encode_for_classification(self._tokenizer(), texts, max_length, pad)
        run = EstimationRun(str(body), body, device, model, train.texts, texts, examples, max_length,
                            time.perf_counter())
        tensors, info = STATISTICS[kind](model, examples, labels, estimator=cfg["estimator"],
                                         batch_size=cfg["batch_size"], seed=self.recipe["seed"], progress=self.progress)
        info = {**info, "task": task, "head": head.name, "model_kind": "sequence_classification"}
        store_statistic(run, kind, tensors, info, out,
                        parameter_of=layer_parameter if kind in LAYER_STAT_FACTORS else str,
                        n=len(train.texts), data_name=f"task:{task}:train", overwrite=True)

    def _base_fisher(self, out: Path) -> None:
        """The base language model's diagonal Fisher (its own next-token objective) for the body tensors: H₀."""
        from unmerge.models import load_causal_lm
        from unmerge.sources import load_texts
        from unmerge.text import encode_examples

        cfg = self.recipe["stats"]["base_fisher"]
        texts = load_texts(cfg["data"])
        used = texts[: cfg["examples"]]
        device = resolve_device(self.device)
        model, tokenizer = load_causal_lm(self.base_dir(), device=str(device))
        encoded = encode_examples(tokenizer, used, cfg["max_length"])
        run = EstimationRun(str(self.body_base), self.body_base, device, model, texts, used, encoded,
                            cfg["max_length"], time.perf_counter())
        fisher, info = diagonal_fisher(model, encoded, estimator=self.recipe["stats"]["estimator"],
                                       batch_size=self.recipe["stats"]["batch_size"], seed=self.recipe["seed"],
                                       progress=self.progress)
        info = {**info, "role": "base", "objective": "causal LM next-token likelihood (the base's own)"}
        store_statistic(run, "fisher", fisher, info, out, parameter_of=str, n=cfg["n"], data_name=str(cfg["data"]),
                        overwrite=True)

    def _merge(self, m: MergeSpec, out: Path) -> None:
        kinds = required_stats(get_method(m.method), m.params)
        stats = {}
        for kind in kinds:
            if kind == "base_fisher":
                stats[kind] = [Statistic(self.stat_dirs[("base_fisher", "")])]
            else:
                stats[kind] = [Statistic(self.stat_dirs[(kind, t)]) for t in m.tasks]
        merge_checkpoints(m.method, Checkpoint(self.body_base), [Checkpoint(self.trained[t] / BODY_DIR) for t in m.tasks],
                          out, params=m.params, stats=stats, device=self.device, progress=False, overwrite=True,
                          description={"candidate": m.label, "alpha": m.alpha, "tasks": m.tasks})

    def _evaluate(self, cand: dict[str, Any]) -> None:
        from unmerge.evaluation.accuracy import classification_accuracy

        ev, tokenizer, pad = self.recipe["evaluate"], self._tokenizer(), self._pad_id()
        rows, records = [], []
        for task in self.task_names:
            model = load_classifier(cand["body"][task], head_file(cand["heads"][task], task), pad_id=pad,
                                    device=str(resolve_device(self.device)))
            test = self.splits[task].test
            start = time.perf_counter()
            metrics, recs = classification_accuracy(model, tokenizer, test.texts, test.labels,
                                                    batch_size=ev["batch_size"],
                                                    max_length=self.recipe["train"]["max_length"],
                                                    n_boot=ev["n_boot"], seed=self.recipe["seed"], progress=False)
            acc = metrics["accuracy"]
            rows.append({"metric": f"accuracy.{task}", "value": acc["value"], "ci_low": acc["ci_low"],
                         "ci_high": acc["ci_high"], "n": acc["n"], "f1_macro": metrics["f1.macro"]["value"],
                         "chance": 1.0 / test.n_labels, "seconds": round(time.perf_counter() - start, 3)})
            records += [{"task": task, **rec} for rec in recs]
        rows.append({"metric": "accuracy.average", "value": sum(r["value"] for r in rows) / len(rows),
                     "n": len(rows), "over": "tasks (unweighted mean of the per-task accuracies)"})
        write_json_atomic(cand["eval"], {"candidate": cand["name"], "rows": rows, "records": records})

    # -- execution -----------------------------------------------------------------------------------------------
    def execute(self) -> Path:
        torch.manual_seed(self.recipe["seed"])
        self.splits  # noqa: B018 -- loads every task's data now: a missing package or bad reference fails first
        check_output_location(self.out, [self.base_dir()], overwrite=self.overwrite)
        steps = self.plan()
        execute_steps(self.cache, steps, self.timings)
        return self.write_report(steps)

    def describe(self) -> str:
        """A dry run: the recipe validated, its tasks with sizes and its stages (cached or not)."""
        lines = [f"recipe '{self.recipe['name']}' (kind: merge) is valid; report -> {self.out}",
                 f"base model: {self.recipe['base_model']}"]
        for name, split in self.splits.items():
            lines.append(f"task {name}: {split.train.n_labels} classes ({', '.join(split.train.label_names)}), "
                         f"{len(split.train.texts)} train / {len(split.test.texts)} test")
        steps = self.plan()
        lines.append(f"{len(steps)} stages (+ report):")
        lines += [f"  [{'cached' if s.cached else 'to run'}] {s.stage:17s} {s.what}" for s in steps]
        return "\n".join(lines)

    def write_report(self, steps: list[PlanStep]) -> Path:
        from unmerge.report import write_bundle

        rows, records = [], []
        merge_info = {}
        for cand in self.candidates:
            result = json.loads(cand["eval"].read_text())
            rows += [{"candidate": cand["name"], "method": cand["method"] or cand["name"], "alpha": cand["alpha"], **row}
                     for row in result["rows"]]
            records += [{"candidate": cand["name"], **rec} for rec in result["records"]]
            if cand.get("merge") is not None:
                info = json.loads((Path(cand["body"][self.task_names[0]]) / "merge_info.json").read_text())
                merge_info[cand["name"]] = _rules(info)
        self.inputs["model:base"] = checkpoint_hash(Checkpoint(self.base_dir()))
        for name, path in self.trained.items():
            self.inputs[f"model:{name}"] = checkpoint_hash(Checkpoint(path / BODY_DIR))
        for (kind, task), path in sorted(self.stat_dirs.items()):
            self.inputs[f"statistic:{kind}:{task or 'base'}"] = checkpoint_hash(Checkpoint(path))
        r = self.recipe
        swept = list(dict.fromkeys(m.label for m in self.merges if m.alpha is not None))
        curves = r["report"]["alpha_curves"] or {
            "metrics": ["accuracy.average"] + [f"accuracy.{t}" for t in self.task_names], "methods": swept,
            "references": list(REFERENCES)}
        plots = {"alpha_curves": curves}
        run = report_run(
            r, self.given, f"Multi-task merging report: {r['name']}", rows, records, self.timings, self.inputs,
            eligible=[c["name"] for c in self.candidates if c["method"]],
            seeds={"recipe": r["seed"]},
            caveats=self.caveats(merge_info),
            base_candidate="base",
            protocol={"tasks": {t: {"classes": s.train.label_names, "train": len(s.train.texts),
                                    "test": len(s.test.texts)} for t, s in self.splits.items()},
                      "train": r["train"], "stats": r["stats"], "merge": r["merge"], "evaluate": r["evaluate"],
                      "heads": "each task is evaluated with the merged body and its own head (the head of its "
                               "individual model; the multitask model uses its own heads)",
                      "tensor_rules": merge_info},
            plots=plots,
        )
        return write_bundle(self.out, run, overwrite=self.overwrite)

    def caveats(self, merge_info: dict[str, Any]) -> list[str]:
        notes = list(self.recipe["report"]["caveats"])
        notes.append("Accuracy is on balanced test sets of a few hundred examples per task (chance = 1 / classes, "
                     "in metric_details.jsonl); differences inside the bootstrap intervals are not meaningful.")
        if self.selection_rule():
            notes.append("The selection rule reads the test sets themselves (there is no validation split): the "
                         "selected candidate is the best of the eligible ones on these data, and its accuracy is an "
                         "optimistic estimate.")
        notes.append("Only the shared body is merged; every task keeps the head trained with its individual model, "
                     "which was fitted to that model's body, not to the merged one.")
        return notes


def _rules(info: dict[str, Any]) -> dict[str, int]:
    """How many tensors of a merge went through each rule (from ``merge_info.json``'s per-tensor records)."""
    counts: dict[str, int] = {}
    for record in (info.get("per_tensor") or {}).values():
        rule = record.get("rule")
        if rule:
            key = f"{rule} ({record['reason']})" if record.get("reason") else rule
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
