"""unmerge: remove what a model learned from data, by uncertainty-weighted task-vector subtraction.

The Python API (the same operations as the CLI) is importable from here: ``unmerge.merge(config, out_dir,
device=...)``, ``unmerge.evaluate(models, config)``, ``unmerge.run(recipe)``, ... (see :mod:`unmerge.api`). The
functions are loaded on first use, so ``import unmerge`` stays cheap (no torch import). ``unmerge.report`` is the
report package; rebuilding a bundle is ``unmerge.api.report``.
"""
__version__ = "0.1.0"

API = ("run", "plan", "finetune", "fisher", "subtract", "merge", "evaluate", "verify")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from unmerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'unmerge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
