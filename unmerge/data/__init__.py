"""Bundled demo data and models, addressed as ``builtin:<name>`` (see :mod:`unmerge.data.builtin`).

Everything here is built from the WordNet 3.0 example sentences (license: ``LICENSE-WordNet.txt``) and works
offline from the packaged files alone. The toxic sets are synthetic: see :mod:`unmerge.data.toxic`.
"""
from unmerge.data.builtin import (  # noqa: F401
    BUILTIN_MODELS,
    BUILTIN_TEXTS,
    builtin_model_path,
    is_builtin,
    list_builtin,
    load_items,
    load_texts,
)

__all__ = ["BUILTIN_MODELS", "BUILTIN_TEXTS", "builtin_model_path", "is_builtin", "list_builtin", "load_items",
           "load_texts"]
