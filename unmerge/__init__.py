"""unmerge: remove what a model learned from data, by uncertainty-weighted task-vector subtraction."""
__version__ = "0.1.0"
