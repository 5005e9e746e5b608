"""Command line: a thin layer over ``unmerge.api``. User mistakes print one paragraph and exit 2."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from unmerge.errors import UnmergeError


def friendly(fn):
    """Turn ``UnmergeError`` into a message + hint on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnmergeError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(2)

    return wrapper


def device_option(fn):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present), cpu, cuda or cuda:N")(fn)


def quiet_option(fn):
    return click.option("--quiet", is_flag=True, help="no progress bars, warnings only")(fn)


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unmerge")
def main() -> None:
    """unmerge: remove what a model learned from data, and merge models, with uncertainty-aware weighting."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="report directory (default: the recipe's report.dir)")
@device_option
@click.option("--seed", type=int, help="override the recipe's seed")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="stage cache (default $UNMERGE_CACHE or "
              "~/.cache/unmerge)")
@click.option("--dry-run", is_flag=True, help="validate the recipe and print its plan; download and compute nothing")
@click.option("--threads", type=int, help="torch CPU threads (recorded in the report; on a busy machine 1 can be "
              "faster than several)")
@quiet_option
@friendly
def run(recipe, out, device, seed, cache_dir, dry_run, threads, quiet):
    """Run a RECIPE (unlearning, or `kind: merge` multi-task merging) end to end and write its report bundle."""
    from unmerge import api

    _logging(quiet)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if dry_run:
        click.echo(api.plan(recipe, out=out, seed=seed, cache_dir=cache_dir))
        return
    bundle = api.run(recipe, out=out, device=device, seed=seed, cache_dir=cache_dir, progress=not quiet)
    click.echo(f"report: {bundle}")


@main.command()
@click.argument("model")
@click.argument("data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--epochs", type=float, default=2.0, show_default=True)
@click.option("--max-steps", type=int, default=-1, show_default=True, help="overrides --epochs when > 0")
@click.option("--learning-rate", "--lr", type=float, default=5e-4, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lora-r", type=int, help="train LoRA adapters of this rank and merge them into OUT (needs peft)")
@click.option("--lora-alpha", type=float, help="LoRA alpha (scale alpha/r; default 16)")
@click.option("--lora-dropout", type=float, help="LoRA dropout (default 0)")
@click.option("--lora-target", "lora_targets", multiple=True,
              help="module name to adapt (repeat; default: peft's choice for the architecture, c_attn for GPT-2)")
@click.option("--overwrite", is_flag=True, help="replace OUT if unmerge wrote it before")
@device_option
@quiet_option
@friendly
def finetune(model, data, out, epochs, max_steps, learning_rate, batch_size, max_length, seed, lora_r, lora_alpha,
             lora_dropout, lora_targets, overwrite, device, quiet):
    """Fine-tune MODEL on DATA (the forget set) into OUT, keeping AdamW's second moment in OUT/adam_v (with
    --lora-r: LoRA adapters, merged into OUT, adapter in OUT/lora). Under `accelerate launch` --batch-size is the
    global batch and only the main process writes."""
    from unmerge import api

    _logging(quiet)
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout,
                              "target_modules": list(lora_targets) or None}.items() if v is not None}
    if lora and "r" not in lora:
        raise click.UsageError("--lora-alpha/--lora-dropout/--lora-target need --lora-r")
    info = api.finetune(model, data, out, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
                        batch_size=batch_size, max_length=max_length, seed=seed, device=device, progress=not quiet,
                        overwrite=overwrite, lora=lora or None)
    click.echo(f"wrote {out}: {info['steps']} steps, final loss {info['train_loss']:.4f}")


@main.command()
@click.argument("model")
@click.argument("data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--examples", type=int, help="use the first N examples (default: all)")
@click.option("--estimator", type=click.Choice(["sampled", "empirical"]), default="sampled", show_default=True,
              help="labels sampled from the model (true Fisher) or the observed tokens (a sequence classifier: the "
                   "data file's label column)")
@click.option("--level", type=click.Choice(["sequence", "token"]), default="sequence", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--n", "n_scale", type=float, help="N recorded with the statistic (default: dataset size)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@device_option
@quiet_option
@friendly
def fisher(model, data, out, examples, estimator, level, batch_size, max_length, n_scale, seed, overwrite, device,
           quiet):
    """Estimate the diagonal Fisher of MODEL on DATA and store it in OUT (safetensors + statistic.json)."""
    from unmerge import api

    _logging(quiet)
    meta = api.fisher(model, data, out, examples=examples, estimator=estimator, level=level, batch_size=batch_size,
                      max_length=max_length, n=n_scale, seed=seed, device=device, progress=not quiet,
                      overwrite=overwrite)
    click.echo(f"wrote {out}: {meta['n_examples']} examples, N = {meta['N']:g}, path {meta['path']}")


@main.command()
@click.argument("base")
@click.argument("forget")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--method", default="uncertainty_removal", show_default=True,
              help="uncertainty_removal, negation or fisher_negation")
@click.option("--alpha", type=float, required=True, help="removal strength α")
@click.option("--base-fisher", type=click.Path(exists=False), help="Fisher of BASE on the original/retain data")
@click.option("--forget-fisher", type=click.Path(exists=False), help="Fisher of FORGET on the forget set")
@click.option("--n-base", type=float, help="N₀ (default: recorded in --base-fisher)")
@click.option("--n-forget", type=float, help="N_f (default: recorded in --forget-fisher)")
@click.option("--m-max", type=float, help="guard: clamp of the multiplier (0 = off)")
@click.option("--rho", type=float, help="guard: floor H₀ at rho·mean(H₀) per tensor (0 = off)")
@click.option("--damping", type=float, help="δ added to H₀")
@click.option("--force", is_flag=True, help="use statistics recorded for a different model")
@click.option("--allow-pickle", is_flag=True, help="allow pickle .bin checkpoints (they can run code)")
@click.option("--overwrite", is_flag=True)
@device_option
@quiet_option
@friendly
def subtract(base, forget, out, method, alpha, base_fisher, forget_fisher, n_base, n_forget, m_max, rho, damping,
             force, allow_pickle, overwrite, device, quiet):
    """Remove the task vector FORGET − BASE from BASE into OUT, streamed tensor by tensor."""
    from unmerge import api

    _logging(quiet)
    params = {k: v for k, v in {"alpha": alpha, "n_base": n_base, "n_forget": n_forget, "m_max": m_max, "rho": rho,
                                "damping": damping}.items() if v is not None}
    result = api.subtract(base, forget, out, method=method, params=params, base_fisher=base_fisher,
                          forget_fisher=forget_fisher, device=device, force=force, allow_pickle=allow_pickle,
                          overwrite=overwrite, progress=not quiet)
    extra = f", clamped fraction {result.totals['clamped_fraction']:.4f}" if "clamped_fraction" in result.totals else ""
    click.echo(f"wrote {out} ({result.method}, {result.seconds:.2f}s{extra})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--out-shard-size", default="2GB", show_default=True)
@click.option("--force", is_flag=True, help="use statistics recorded for a different model")
@click.option("--allow-pickle", is_flag=True, help="allow pickle .bin checkpoints (they can run code)")
@click.option("--overwrite", is_flag=True)
@device_option
@quiet_option
@friendly
def merge(config, out, out_shard_size, force, allow_pickle, overwrite, device, quiet):
    """Merge models described by a mergekit-shaped CONFIG (YAML) into OUT."""
    from unmerge import api

    _logging(quiet)
    result = api.merge(config, out, device=device, overwrite=overwrite, out_shard_size=out_shard_size,
                       allow_pickle=allow_pickle, force=force, progress=not quiet)
    click.echo(f"wrote {out} ({result.method}, {result.seconds:.2f}s)")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False),
              help="YAML with an `evaluate:` section (protocols), optional seed, data {forget, retain}, select, report")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="report bundle directory")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="result cache (default $UNMERGE_CACHE)")
@device_option
@quiet_option
@friendly
def evaluate(models, config, out, cache_dir, device, quiet):
    """Evaluate MODELS (local directories, builtin: names or hub ids) and write a report bundle; results are cached
    by (model, protocol), so a re-run computes only what is new."""
    from unmerge import api

    _logging(quiet)
    result = api.evaluate(list(models), config, out, device=device, cache_dir=cache_dir, progress=not quiet)
    click.echo(f"report: {result.bundle}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="write the rebuilt bundle here (default: in place)")
@click.option("--select", "select_rule", help='another selection rule, e.g. "minimize toxicity.mean subject to '
              'perplexity <= 1.1 * base" given as YAML: "{minimize: toxicity.mean, subject_to: ...}"')
@friendly
def report(directory, out, select_rule):
    """Rebuild a report bundle (tables, plots, Markdown, HTML, manifest) from the results it holds."""
    import yaml

    from unmerge import api

    selection = yaml.safe_load(select_rule) if select_rule else None
    click.echo(f"report: {api.report(directory, out=out, selection=selection)}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@friendly
def verify(directory):
    """Re-hash every file of a report bundle; exit 1 naming any missing, changed or unlisted file."""
    from unmerge import api

    problems = api.verify(directory)
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        sys.exit(1)
    click.echo(f"OK {directory}: every file matches manifest.json")


@main.command()
@click.argument("name", required=False)
@friendly
def methods(name):
    """List the merge methods with their parameters, or show one method in full."""
    from unmerge.methods import all_methods, get_method

    if name:
        method = get_method(name)
        click.echo(f"{method.name}: {method.summary}\n  formula: {method.formula}")
        if method.aliases:
            click.echo(f"  aliases: {', '.join(method.aliases)}")
        if method.stats:
            click.echo(f"  statistics: {', '.join(method.stats)}")
        for param in method.params:
            click.echo(f"  {param.describe()}")
        return
    for method in all_methods():
        params = ", ".join(f"{p.name}={p.default!r}" for p in method.params)
        click.echo(f"{method.name:22s} {method.formula}\n{'':22s} params: {params or '-'}")


from unmerge.stats.cli import stats_command  # noqa: E402

main.add_command(stats_command)


@main.group()
def bench() -> None:
    """Benchmarks that print side-by-side figures measured in one run."""


@bench.command("merge")
@click.option("--size", default="1GB", show_default=True, help="size of each synthetic fp32 checkpoint")
@click.option("--models", "n_models", type=int, default=3, show_default=True, help="checkpoints, base included")
@click.option("--methods", default="task_arithmetic,ties", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="/tmp/unmerge-bench-merge", show_default=True,
              help="where the synthetic checkpoints are written (reused between runs)")
@click.option("--mergekit/--no-mergekit", default=True, show_default=True,
              help="also run mergekit on the same job when it is found")
@click.option("--mergekit-bin", default=None, metavar="PATH",
              help="the mergekit-yaml executable (e.g. in its own virtualenv)  [default: mergekit-yaml on PATH]")
@click.option("--device", default="cpu", show_default=True, help="device for unmerge's math (cpu, cuda, auto)")
@click.option("--threads", type=int, help="torch CPU threads of every job (OMP_NUM_THREADS), mergekit's included")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="runs of every job, in rounds; each row is the job's median run")
@friendly
def bench_merge(size, n_models, methods, workdir, mergekit, mergekit_bin, device, threads, repeat):
    """Streaming merge against the I/O floor (and mergekit): wall time, ratio, peak RSS and anonymous memory."""
    import pandas as pd

    from unmerge.bench.merge import bench_merge as run_bench
    from unmerge.checkpoint.writer import parse_size

    rows = run_bench(Path(workdir), parse_size(size), n_models, tuple(m for m in methods.split(",") if m), mergekit,
                     mergekit_bin, device, threads, repeat)
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        click.echo(pd.DataFrame(rows).astype(object).fillna("").to_string(index=False))


@bench.command("fisher")
@click.option("--model", "model_name", type=click.Choice(["tiny", "gpt2-small"]), default="tiny", show_default=True,
              help="the builtin tiny-lm, or a random GPT-2 small configuration (124M parameters)")
@click.option("--examples", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--paths", default="loop,hooks,vmap", show_default=True,
              help="comma-separated Fisher paths to time (the loop always runs: it is the reference)")
@click.option("--level", type=click.Choice(["sequence", "token"]), default="sequence", show_default=True)
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="timed runs of each path, taking turns; the median is reported")
@friendly
def bench_fisher(model_name, examples, batch_size, paths, level, threads, repeat):
    """Per-example Fisher: hooks and vmap paths against the batch-1 loop (examples/s, ratio, peak anonymous memory)."""
    import pandas as pd
    import torch

    from unmerge.bench.paths import bench_fisher as run_bench

    if threads:
        torch.set_num_threads(threads)
    rows = run_bench(model_name, examples, batch_size, paths=tuple(p for p in paths.split(",") if p), level=level,
                     repeat=repeat)
    with pd.option_context("display.width", 200):
        click.echo(pd.DataFrame(rows).to_string(index=False))


@bench.command("generate")
@click.option("--prompts", type=int, default=32, show_default=True)
@click.option("--samples", type=int, default=4, show_default=True, help="samples per prompt")
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--threads", type=int, help="torch CPU threads")
@friendly
def bench_generate(prompts, samples, max_new_tokens, batch_size, threads):
    """Batched generation (left padding, KV cache) against one prompt at a time: new tokens/s and the ratio."""
    import torch

    from unmerge.bench.paths import bench_generate as run_bench

    if threads:
        torch.set_num_threads(threads)
    for key, value in run_bench(prompts, samples, max_new_tokens, batch_size).items():
        click.echo(f"{key:20s} {value}")


if __name__ == "__main__":
    main()
