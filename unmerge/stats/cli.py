"""``unmerge stats MODEL DATA OUT --kind fisher|gram|kfac``: one command for every statistic.

``stats_command`` is a standalone ``click.Command``; ``unmerge/cli.py`` registers it with
``main.add_command(stats_command)``.
"""
from __future__ import annotations

import click

from unmerge.stats.compute import KINDS

# options that only some kinds take, and the kinds that take them
_ONLY_FOR = {"estimator": ("fisher", "kfac"), "level": ("fisher",), "seed": ("fisher", "kfac")}


@click.command("stats")
@click.argument("model")
@click.argument("data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(KINDS), default="fisher", show_default=True,
              help="fisher: diagonal Fisher per parameter; gram: RegMean input Grams per linear layer "
                   "(<module>.gram); kfac: K-FAC factors per linear layer (<module>.A, <module>.G)")
@click.option("--examples", type=int, help="use the first N examples (default: all)")
@click.option("--estimator", type=click.Choice(["sampled", "empirical"]),
              help="fisher/kfac: labels sampled from the model (default, the true Fisher) or the observed tokens")
@click.option("--level", type=click.Choice(["sequence", "token"]), help="fisher: example = sequence (default) or token")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--n", "n_scale", type=float, help="N recorded with the statistic (default: dataset size)")
@click.option("--seed", type=int, help="fisher/kfac: seed of the sampled labels (default 0)")
@click.option("--overwrite", is_flag=True, help="replace OUT if unmerge wrote it before")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N")
@click.option("--quiet", is_flag=True, help="no progress bars, warnings only")
def stats_command(model, data, out, kind, examples, estimator, level, batch_size, max_length, n_scale, seed, overwrite,
                  device, quiet):
    """Estimate a statistic (--kind fisher, gram or kfac) of MODEL on DATA and store it in OUT."""
    from unmerge.cli import _logging, friendly

    given = {"estimator": estimator, "level": level, "seed": seed}
    for option, kinds in _ONLY_FOR.items():
        if given[option] is not None and kind not in kinds:
            raise click.UsageError(f"--{option} applies to --kind {' or '.join(kinds)}, not {kind}")

    @friendly
    def run():
        from unmerge.sources import load_texts
        from unmerge.stats.compute import estimate_statistic, fisher_data

        _logging(quiet)
        options = {k: v for k, v in given.items() if v is not None}
        if kind == "fisher":  # a sequence classifier's empirical Fisher reads the data's label column
            texts, options["labels"] = fisher_data(model, data, options.get("estimator", "sampled"))
        else:
            texts = load_texts(data)
        meta = estimate_statistic(kind, model, texts, out, examples=examples, batch_size=batch_size,
                                  max_length=max_length, n=n_scale, device=device, progress=not quiet,
                                  overwrite=overwrite, data_name=str(data), **options)
        size = f"{meta['n_tokens']} tokens" if "n_tokens" in meta else f"path {meta['path']}"
        click.echo(f"wrote {out}: {kind}, {meta['n_examples']} examples, {size}, N = {meta['N']:g}")

    run()
