"""Fine-tuning on the forget set (transformers Trainer)."""
from unmerge.train.finetune import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
