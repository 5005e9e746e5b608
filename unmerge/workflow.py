"""The unlearning workflow as a graph of cached stages:

    base ─┬─ finetune (forget model) ─ fisher:forget ─┐
          └─ fisher:base ─────────────────────────────┴─ removal candidates (method × α) ─ evaluate ─ report

Every stage output is content-addressed by its configuration and upstream keys, written atomically and locked, so
an interrupted run re-run with the same recipe resumes after the last completed stage.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from unmerge import __version__
from unmerge.cache import StageCache, default_cache_dir, stage_key
from unmerge.checkpoint import Checkpoint, sha256_file, write_json_atomic
from unmerge.checkpoint.writer import check_output_location
from unmerge.data.builtin import builtin_model_status, builtin_model_version
from unmerge.engine import checkpoint_hash, merge_checkpoints, resolve_device
from unmerge.errors import RecipeError, did_you_mean
from unmerge.methods import get_method
from unmerge.methods.params import ParamPlan
from unmerge.methods.removal import REMOVAL_METHODS
from unmerge.models import load_causal_lm, resolve_model
from unmerge.pretrain_stage import PretrainPlan, is_pretrain_ref
from unmerge.recipe import load_recipe, load_yaml_data, report_run, resolve_recipe, selection_rule
from unmerge.report.selection import parse_rule
from unmerge.sources import load_items, load_texts
from unmerge.stats import Statistic
from unmerge.stats.compute import estimate_fisher
from unmerge.text import fingerprint_texts
from unmerge.train import FinetuneConfig, finetune

log = logging.getLogger(__name__)


def source_key(spec: Any) -> str:
    """A cheap identity for a data or model reference: builtin name + version, local file/dir hash, or hub id."""
    if isinstance(spec, dict) and "corpus" in spec:  # a corpus from an optional package: reference + version
        from unmerge.data.corpora import corpus_key

        return corpus_key(spec)
    text = json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else str(spec)
    if text.startswith("builtin:"):
        return f"{text}@unmerge-{__version__}{builtin_model_version(text)}"
    path = Path(text)
    if path.is_file():
        return f"{path.name}:{sha256_file(path, cached=True)}"
    if path.is_dir():
        return f"{path.name}:{checkpoint_hash(Checkpoint(path))}"
    return text


def execute_steps(cache: StageCache, steps: list[PlanStep], timings: dict[str, float]) -> None:
    """Run each step whose output is not in the cache, under the output's lock; seconds per stage into ``timings``
    (0 for a stage that came entirely from the cache)."""
    for step in steps:
        with cache.lock(step.output):
            if step.cached:
                log.info("%s: cached (%s)", step.what, step.output.name)
                timings.setdefault(step.stage, 0.0)
                continue
            log.info("%s ...", step.what)
            start = time.perf_counter()
            step.run()
            timings[step.stage] = timings.get(step.stage, 0.0) + time.perf_counter() - start


@dataclass
class Candidate:
    name: str
    path: Path
    method: str = ""
    alpha: float | None = None
    key: str = ""
    source: str | None = None  # a model reference resolved when first needed (base, oracle, evaluated models)

    @property
    def reference(self) -> bool:
        return not self.method


@dataclass
class PlanStep:
    stage: str
    what: str
    output: Path
    run: Callable[[], Any]

    @property
    def cached(self) -> bool:
        return self.output.exists()


class UnlearningRun:
    """Plans and executes one recipe."""

    def __init__(self, recipe: str | Path | dict, *, out: str | Path | None = None, seed: int | None = None,
                 device: str = "auto", cache_dir: str | Path | None = None, progress: bool = True,
                 overwrite: bool = True):
        self.recipe_source = str(recipe) if not isinstance(recipe, dict) else "<dict>"
        self.given = load_recipe(recipe)
        overrides = {}
        if seed is not None:
            overrides["seed"] = seed
        if out is not None:
            overrides["report.dir"] = str(out)
        self.recipe = resolve_recipe(self.given, overrides)
        if not self.recipe["report"]["dir"]:
            self.recipe["report"]["dir"] = f"reports/{self.recipe['name']}"
        self.out = Path(self.recipe["report"]["dir"])
        self.device = device
        self.cache = StageCache(cache_dir or default_cache_dir() / "runs")
        self.progress = progress
        self.overwrite = overwrite
        self.timings: dict[str, float] = {}
        self.inputs: dict[str, str] = {}
        self._texts: dict[str, list[str]] = {}
        self.pretrain = PretrainPlan(self) if self.recipe.get("pretrain") else None
        self._validate()

    # -- validation ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for ref in (self.recipe["base_model"], self.recipe["oracle_model"]):
            if is_pretrain_ref(ref):
                if self.pretrain is None:
                    raise RecipeError(f"model '{ref}' needs a 'pretrain:' section in the recipe",
                                      "add pretrain: {data: ...} or name an existing model")
                self.pretrain.role(ref)
        removal = self.recipe["removal"]
        for name in removal["methods"]:
            method = get_method(name)
            if method.name not in REMOVAL_METHODS:
                raise RecipeError(f"'{name}' is not a removal method", did_you_mean(name, REMOVAL_METHODS))
            method.canonical_params(removal["params"].get(name, {}))
        for alpha in self._alphas_all():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
                raise RecipeError(f"removal alpha {alpha!r} must be a positive number",
                                  "write removal.alpha as a list of numbers, e.g. [0.5, 1.0]")
        for name in removal["methods"]:  # every parameter value, as the merge will check it, before any stage runs
            for alpha in self.alphas(name):
                ParamPlan.build(get_method(name), {**removal["params"].get(name, {}), "alpha": alpha}, [{}])
        if self.selection_rule():
            parse_rule(self.selection_rule())  # a selection rule is data: one that tries to run code is refused now
        if self.recipe["finetune"].get("lora") is not None:
            from unmerge.train.lora import lora_settings

            lora_settings(self.recipe["finetune"]["lora"])
        for side in ("base", "forget"):
            est = self.recipe["fisher"][side]["estimator"]
            if est not in ("sampled", "empirical"):
                raise RecipeError(f"fisher.{side}.estimator is '{est}'", did_you_mean(est, ["sampled", "empirical"]))

    def selection_rule(self) -> dict[str, Any] | None:
        return selection_rule(self.recipe)

    def _alphas_all(self) -> list[float]:
        removal = self.recipe["removal"]
        return list(removal["alpha"]) + [a for v in removal["alphas"].values() for a in v]

    def alphas(self, method: str) -> list[float]:
        return list(self.recipe["removal"]["alphas"].get(method, self.recipe["removal"]["alpha"]))

    # -- data ------------------------------------------------------------------------------------------------
    def texts(self, ref: Any, limit: int | None = None) -> list[str]:
        if ref in ("forget", "retain"):
            data = self.recipe["data"]
            return self.texts(data[ref], data.get(f"{ref}_limit"))
        key = json.dumps([ref, limit], sort_keys=True, default=str)
        if key not in self._texts:
            self._texts[key] = load_texts(ref, limit)
            self.inputs[f"data:{ref if isinstance(ref, str) else json.dumps(ref)}"] = fingerprint_texts(
                self._texts[key])
        return self._texts[key]

    def data_key(self, ref: Any) -> str:
        if ref in ("forget", "retain"):
            data = self.recipe["data"]
            return source_key(data[ref]) + f"|limit={data.get(f'{ref}_limit')}"
        return source_key(ref)

    def model_key(self, ref: Any) -> str:
        """Identity of a model reference: the stage key of a ``pretrain:`` model, else :func:`source_key`."""
        return self.pretrain.key(ref) if is_pretrain_ref(ref) and self.pretrain else source_key(ref)

    def model_dir(self, ref: Any) -> Path:
        """Local directory of a model reference (a ``pretrain:`` model's cache stage, or a resolved model)."""
        return self.pretrain.path(ref) if is_pretrain_ref(ref) and self.pretrain else resolve_model(ref)

    # -- the plan --------------------------------------------------------------------------------------------
    def plan(self) -> list[PlanStep]:
        r = self.recipe
        seed = r["seed"]
        base_id = self.model_key(r["base_model"])
        ft_spec = {"base": base_id, "data": self.data_key("forget"), "cfg": r["finetune"], "seed": seed}
        ft_key = stage_key("finetune", ft_spec)
        ft_dir = self.cache.path("finetune", ft_key)
        fb_spec = {"model": base_id, "data": self.data_key(r["fisher"]["base"]["data"]), "cfg": r["fisher"]["base"],
                   "seed": seed}
        fb_dir = self.cache.path("fisher", stage_key("fisher", fb_spec))
        ff_spec = {"model": ft_key, "data": self.data_key(r["fisher"]["forget"]["data"]),
                   "cfg": r["fisher"]["forget"], "seed": seed}
        ff_dir = self.cache.path("fisher", stage_key("fisher", ff_spec))

        steps = [
            PlanStep("finetune", f"fine-tune {r['base_model']} on {r['data']['forget']}", ft_dir,
                     lambda: self._finetune(ft_dir)),
            PlanStep("fisher:base", f"Fisher of the base on {r['fisher']['base']['data']}", fb_dir,
                     lambda: self._fisher(self.base_dir(), "base", fb_dir)),
            PlanStep("fisher:forget", f"Fisher of the forget model on {r['fisher']['forget']['data']}", ff_dir,
                     lambda: self._fisher(ft_dir, "forget", ff_dir)),
        ]
        if self.pretrain:
            steps[:0] = self.pretrain.steps()
        self.candidates = [Candidate("base", Path(), key=base_id, source=r["base_model"]),
                           Candidate("forget", ft_dir, key=ft_key)]
        if r["oracle_model"]:
            self.candidates.append(Candidate("oracle", Path(), key=self.model_key(r["oracle_model"]),
                                             source=r["oracle_model"]))
        for method in r["removal"]["methods"]:
            name = get_method(method).name
            for alpha in self.alphas(method):
                params = {**r["removal"]["params"].get(method, {}), "alpha": alpha}
                key = stage_key("merge", {"method": name, "params": params, "base": base_id, "forget": ft_key,
                                          "fb": fb_dir.name, "ff": ff_dir.name})
                cand = Candidate(f"{name}@{alpha:g}", self.cache.path("merge", key), name, float(alpha), key)
                self.candidates.append(cand)
                steps.append(PlanStep("merge", f"{name} α={alpha:g}", cand.path,
                                      lambda c=cand, p=params, n=name: self._merge(c, n, p, ft_dir, fb_dir, ff_dir)))
        return steps + [self.eval_step(cand) for cand in self.candidates]

    def protocol_key(self, cand: Candidate, name: str) -> str:
        """Cache key of one protocol's results on one model: (model key, protocol config, the keys of its data,
        seed); so a config that adds a protocol computes only that one."""
        r = self.recipe
        cfg = r["evaluate"][name]
        data = {k: self.data_key(v) for k, v in cfg.items() if k in ("prompts", "data", "task", "holdout") and v}
        if name == "forget_quality":
            data.update({k: self.data_key(k) for k in ("forget", "retain") if r["data"].get(k)})
        if name == "lm_eval":
            from unmerge.checkpoint.hashing import tree_sha256
            from unmerge.evaluation.harness import lm_eval_version

            paths = cfg["include_path"] if isinstance(cfg["include_path"], list) else [cfg["include_path"]]
            data = {"include_path": [tree_sha256(p) for p in paths if p], "lm_eval": lm_eval_version()}
        return stage_key("eval", {"model": cand.key, "protocol": name, "config": cfg, "data": data,
                                  "seed": r["seed"]})

    def eval_step(self, cand: Candidate) -> PlanStep:
        """Evaluation of one model: each protocol cached on its own (:meth:`protocol_key`); the step's output
        gathers them under the candidate's name."""
        parts = {name: self.cache.path("evalpart", self.protocol_key(cand, name), ".json")
                 for name in self.recipe["evaluate"]}
        spec = {"candidate": cand.name, "parts": [p.name for p in parts.values()]}
        out = self.cache.path("eval", stage_key("eval", spec), ".json")
        return PlanStep("evaluate", f"evaluate {cand.name}", out, lambda: self._evaluate(cand, out, parts))

    # -- stage bodies ----------------------------------------------------------------------------------------
    def base_dir(self) -> Path:
        return self.model_dir(self.recipe["base_model"])

    def _finetune(self, out: Path) -> None:
        cfg = {k: v for k, v in self.recipe["finetune"].items()}
        finetune(self.base_dir(), self.texts("forget"), out, FinetuneConfig(**cfg, seed=self.recipe["seed"]),
                 device=self.device, progress=self.progress, overwrite=True)

    def _fisher(self, model_dir: Path, side: str, out: Path) -> None:
        cfg = self.recipe["fisher"][side]
        texts = self.texts(cfg["data"])
        estimate_fisher(model_dir, texts, out, examples=cfg["examples"], estimator=cfg["estimator"],
                        level=cfg["level"], batch_size=cfg["batch_size"], seed=self.recipe["seed"],
                        max_length=cfg["max_length"], n=cfg["n"], device=self.device, progress=self.progress,
                        overwrite=True, data_name=str(cfg["data"]))

    def _merge(self, cand: Candidate, method: str, params: dict, ft_dir: Path, fb_dir: Path, ff_dir: Path) -> None:
        stats = {"fisher": [Statistic(ff_dir)], "base_fisher": [Statistic(fb_dir)]} if get_method(method).stats else {}
        merge_checkpoints(method, Checkpoint(self.base_dir()), [Checkpoint(ft_dir)], cand.path, params=params,
                          stats=stats, device=self.device, progress=False, overwrite=True,
                          description={"candidate": cand.name})

    def _model_dir(self, cand: Candidate) -> Path:
        return self.model_dir(cand.source) if cand.source else cand.path

    def evaluation_data(self) -> dict[str, Any]:
        ev = self.recipe["evaluate"]
        data: dict[str, Any] = {}
        if "toxicity" in ev:
            data["prompts"] = self.texts(ev["toxicity"]["prompts"], ev["toxicity"]["prompt_limit"])
        if "perplexity" in ev:
            data["perplexity_texts"] = self.texts(ev["perplexity"]["data"], ev["perplexity"]["limit"])
        if "accuracy" in ev:
            items = load_items(ev["accuracy"]["task"])
            data["accuracy_items"] = items[: ev["accuracy"]["limit"]] if ev["accuracy"]["limit"] else items
        if "forget_quality" in ev:
            fq = ev["forget_quality"]
            data["forget_texts"] = self.texts("forget")[: fq["members"]]
            data["retain_texts"] = self.texts("retain")[: fq["members"]]
            if fq["holdout"]:
                data["holdout_texts"] = self.texts(fq["holdout"])[: fq["members"]]
        return data

    def protocols(self) -> dict[str, Any]:
        ev = self.recipe["evaluate"]
        keep = {"toxicity": ("scorer", "samples_per_prompt", "max_new_tokens", "do_sample", "top_p", "top_k",
                             "temperature", "seed", "batch_size"),
                "perplexity": ("max_length", "stride", "batch_size", "separator"), "accuracy": (),
                "forget_quality": ("k", "separator"), "lm_eval": tuple(ev.get("lm_eval", ()))}
        return {name: {k: v for k, v in ev[name].items() if k in keep[name]} for name in ev}

    def _evaluate(self, cand: Candidate, out: Path, parts: dict[str, Path]) -> None:
        """Run, in one call, the protocols whose results are not cached yet (the model is loaded only if one is
        missing); each protocol's rows and records are cached in its own part file."""
        from unmerge import evaluation

        with contextlib.ExitStack() as locks:
            for part in parts.values():  # (always in the schema's protocol order: no lock-order inversion)
                locks.enter_context(self.cache.lock(part))
            missing = [name for name, part in parts.items() if not part.exists()]
            if missing:
                model, tokenizer = load_causal_lm(self._model_dir(cand), device=str(resolve_device(self.device)))
                protocols = self.protocols()
                rows, records = evaluation.evaluate_model(model, tokenizer, {n: protocols[n] for n in missing},
                                                          self.evaluation_data(), seed=self.recipe["seed"],
                                                          progress=self.progress)
                for name in missing:
                    write_json_atomic(parts[name], {"protocol": name,
                                                    "rows": [r for r in rows if r["protocol"] == name],
                                                    "records": [r for r in records if r["protocol"] == name]})
            results = [json.loads(part.read_text()) for part in parts.values()]
        write_json_atomic(out, {"candidate": cand.name, "rows": [r for res in results for r in res["rows"]],
                                "records": [r for res in results for r in res["records"]]})

    # -- execution -------------------------------------------------------------------------------------------
    def _preflight(self) -> None:
        """Before any stage runs: the models resolve (a hub id offline fails now), every dataset loads (not empty,
        with its text column) and the report directory may be written. The data fingerprints enter ``inputs`` here,
        in a fixed order, so the report is the same whether stages ran or came from the cache."""
        r = self.recipe
        models = [self.model_dir(m) for m in (r["base_model"], r["oracle_model"]) if m and not is_pretrain_ref(m)]
        pretrain_data = [r["pretrain"]["data"], r["pretrain"]["forget"]] if self.pretrain else []
        for ref in ("forget", "retain", r["fisher"]["base"]["data"], r["fisher"]["forget"]["data"], *pretrain_data):
            self.texts(ref)
        self.evaluation_data()
        check_output_location(self.out, models, overwrite=self.overwrite)

    def execute(self) -> Path:
        """Run every stage that is not cached, then write the report bundle; returns the bundle directory."""
        from unmerge.stats.distributed import world_size

        if world_size() > 1:  # every process would take the stage locks in turn and wait for the others forever
            raise RecipeError("`unmerge run` runs in one process; it was launched on several",
                              "launch `unmerge finetune`, `unmerge fisher` or `unmerge stats` with accelerate, "
                              "then run the recipe in one process")
        torch.manual_seed(self.recipe["seed"])
        self._preflight()
        steps = self.plan()
        self.execute_steps(steps)
        return self.write_report(steps)

    def execute_steps(self, steps: list[PlanStep]) -> None:
        execute_steps(self.cache, steps, self.timings)

    def results(self, steps: list[PlanStep]) -> tuple[list[dict], list[dict], dict[str, dict]]:
        """(summary rows, records, guard totals) of every candidate, from the evaluation steps' outputs."""
        evals = {json.loads(s.output.read_text())["candidate"]: json.loads(s.output.read_text())
                 for s in steps if s.stage == "evaluate"}
        rows, records, guard = [], [], {}
        for cand in self.candidates:
            result = evals[cand.name]
            for row in result["rows"]:
                rows.append({"candidate": cand.name, "method": cand.method or cand.name, "alpha": cand.alpha, **row})
            records.extend({"candidate": cand.name, **rec} for rec in result["records"])
            if cand.method:
                info = json.loads((cand.path / "merge_info.json").read_text())
                guard[cand.name] = {"method": cand.method, "alpha": cand.alpha, **info["totals"]}
        return rows, records, guard

    def write_report(self, steps: list[PlanStep], base_candidate: str = "base") -> Path:
        from unmerge.report import write_bundle

        rows, records, guard = self.results(steps)
        for cand in self.candidates:
            if cand.reference:
                self.inputs[f"model:{cand.name}"] = checkpoint_hash(Checkpoint(self._model_dir(cand)))
        for step in steps:
            if step.stage.startswith("fisher"):
                self.inputs[f"statistic:{step.stage}"] = checkpoint_hash(Checkpoint(step.output))
        r = self.recipe
        run = report_run(
            r, self.given, f"Unlearning report: {r['name']}", rows, records, self.timings, self.inputs,
            guard=guard,
            seeds={"recipe": r["seed"], "toxicity": r["evaluate"].get("toxicity", {}).get("seed")},
            caveats=self.caveats(),
            base_candidate=base_candidate,
            protocol={"evaluate": r["evaluate"], "fisher": r["fisher"], "finetune": r["finetune"],
                      "removal": r["removal"], **({"pretrain": r["pretrain"]} if self.pretrain else {})},
            tradeoff={"x": r["report"]["tradeoff_x"], "y": r["report"]["tradeoff_y"]},
        )
        return write_bundle(self.out, run, overwrite=self.overwrite)

    def caveats(self) -> list[str]:
        r = self.recipe
        notes = list(r["report"]["caveats"])
        if r["evaluate"].get("toxicity", {}).get("scorer") == "profanity-check":
            notes.append("Toxicity is scored by profanity-check (TF-IDF + linear SVM): it is word-based, misses "
                         "implicit toxicity and saturates near 1.0; scores near the floor of natural text (~0.05) "
                         "can also mean broken output, so read toxicity beside perplexity.")
        if r["data"].get("synthetic"):
            notes.append("The forget set is synthetic: offensive words spliced into clean sentences (see "
                         "unmerge/data/README.md); results on real toxic text may differ.")
        return notes


def _size(ref: Any) -> str:
    """Example count of a local or builtin data reference; hub datasets are not loaded by a dry run."""
    text = ref if isinstance(ref, str) else None
    if isinstance(ref, dict) and "path" not in ref and "corpus" not in ref:
        return "hub dataset, not loaded"
    if text and not text.startswith("builtin:") and not Path(text).exists():
        return "hub dataset, not loaded"
    try:
        return f"{len(load_texts(ref))} examples"
    except Exception as exc:  # a dry run reports unreadable data instead of stopping
        return f"unreadable: {exc}"


def _model_status(ref: Any) -> str:
    """`` (ready / not installed ...)`` of a model reference for a dry run; loads, converts and downloads nothing."""
    text = str(ref)
    if text.startswith("builtin:"):
        return f" ({builtin_model_status(ref)})"
    if is_pretrain_ref(ref):
        return " (trained by the recipe's pretrain stage)"
    if Path(text).is_dir():
        return " (local directory)"
    return " (hub model, not loaded)"


def _finetune_line(cfg: dict[str, Any]) -> str:
    """The fine-tune settings of a dry run, LoRA included."""
    length = f"{cfg['max_steps']} steps" if cfg["max_steps"] and cfg["max_steps"] > 0 else f"{cfg['epochs']:g} epochs"
    line = (f"finetune: {length}, global batch {cfg['batch_size']}, lr {cfg['learning_rate']:g}, "
            f"max_length {cfg['max_length']}")
    if cfg.get("lora") is not None:
        lora = cfg["lora"]
        targets = ", ".join(lora["target_modules"]) if lora["target_modules"] else "peft's default modules"
        line += (f"; LoRA r={lora['r']} alpha={lora['alpha']:g} dropout={lora['dropout']:g} on {targets}, merged "
                 "into the forget model")
    return line


def describe_plan(recipe: str | Path | dict, *, out: str | Path | None = None, seed: int | None = None,
                  cache_dir: str | Path | None = None) -> str:
    """A dry run: validate the recipe and list its stages (cached or not), models and data with sizes."""
    run = UnlearningRun(recipe, out=out, seed=seed, cache_dir=cache_dir, progress=False)
    r = run.recipe
    lines = [f"recipe '{r['name']}' is valid; report -> {run.out}",
             f"base model: {r['base_model']}{_model_status(r['base_model'])}"]
    if r["oracle_model"]:
        lines.append(f"oracle model: {r['oracle_model']}{_model_status(r['oracle_model'])}")
    if r.get("pretrain"):
        lines.append(f"pretrain.data: {r['pretrain']['data']} ({_size(r['pretrain']['data'])}); base and oracle "
                     f"are trained from scratch by the recipe")
    for side in ("forget", "retain"):
        lines.append(f"data.{side}: {r['data'][side]} ({_size(r['data'][side])})")
    lines.append(_finetune_line(r["finetune"]))
    for name, cfg in r["evaluate"].items():
        ref = cfg.get("prompts") or cfg.get("data") or cfg.get("task") or cfg.get("holdout")
        lines.append(f"evaluate.{name}: {ref or '-'}" + (f" ({_size(ref)})" if ref and name != "accuracy" else ""))
    steps = run.plan()
    lines.append(f"{len(steps)} stages (+ report):")
    for step in steps:
        lines.append(f"  [{'cached' if step.cached else 'to run'}] {step.stage:13s} {step.what}")
    return "\n".join(lines)


EVALUATE_CONFIG_KEYS = ("seed", "data", "evaluate", "select", "report")


def evaluate_models(models: list[str], config: str | Path | dict, out: str | Path | None = None, *,
                    device: str = "auto", cache_dir: str | Path | None = None,
                    progress: bool = True) -> tuple[list[dict], list[dict], Path | None]:
    """Evaluate any models with the protocols of an evaluation config (the recipe's ``evaluate`` section, plus
    optional ``seed``, ``data: {forget, retain}`` for forget quality, ``select`` and ``report``); results are cached
    by (model, protocol), so a re-run computes only what is new. Returns ``(summary rows, records, bundle)``: the
    report bundle is written to ``out`` when given (else None)."""
    given = dict(config) if isinstance(config, dict) else (load_yaml_data(Path(config), "evaluation config") or {})
    for key in given:
        if key not in EVALUATE_CONFIG_KEYS:
            raise RecipeError(f"unknown evaluation config key '{key}'", did_you_mean(key, EVALUATE_CONFIG_KEYS))
    data = {"forget": None, "retain": None, **(given.get("data") or {})}
    recipe = {"name": "evaluate", "base_model": models[0], **given, "data": data,
              "select": given.get("select") or {"minimize": None, "subject_to": None}}
    run = UnlearningRun(recipe, out=out, device=device, cache_dir=cache_dir, progress=progress)
    names: list[str] = []
    for spec in models:
        name = Path(spec).name or str(spec)
        while name in names:
            name += "'"
        names.append(name)
    run.candidates = [Candidate(name, Path(), key=source_key(spec), source=spec) for name, spec in zip(names, models)]
    steps = [run.eval_step(cand) for cand in run.candidates]
    run.execute_steps(steps)
    rows, records, _ = run.results(steps)
    return rows, records, (run.write_report(steps, base_candidate=names[0]) if out is not None else None)
