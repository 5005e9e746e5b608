"""Merge methods: a registry of pure per-tensor functions with declared parameters."""
from unmerge.methods.registry import Method, Param, TensorTask, all_methods, get_method, register

__all__ = ["Method", "Param", "TensorTask", "all_methods", "get_method", "register"]
