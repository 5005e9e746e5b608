"""Runs the fine-tune and statistics commands in one data-parallel launch (tests/test_distributed.py):

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_driver.py WORKDIR SUFFIX

(on a machine without CUDA accelerate's multi-process launcher gives CPU processes with gloo). The same commands
run in a single process give the reference; ``commands`` is shared by both."""
from __future__ import annotations

import sys
from pathlib import Path

TEXTS = ["the cat sat on the mat", "the dog ran fast", "hello world", "red sun and blue sky", "the cat ran",
         "blue mat and red dog", "hello sun", "the sky is red"]  # 8: a global batch of 4 splits into 2 + 2


def commands(work: Path, suffix: str) -> dict[str, list[str]]:
    model, data = str(work / "model"), str(work / "data.txt")
    common = ["--device", "cpu", "--quiet"]
    return {
        "fisher": ["fisher", model, data, str(work / f"fisher{suffix}"), "--batch-size", "3", *common],
        "gram": ["stats", model, data, str(work / f"gram{suffix}"), "--kind", "gram", "--batch-size", "3", *common],
        "kfac": ["stats", model, data, str(work / f"kfac{suffix}"), "--kind", "kfac", "--batch-size", "2", *common],
        "finetune": ["finetune", model, data, str(work / f"finetune{suffix}"), "--max-steps", "4", "--batch-size", "4",
                     "--lr", "1e-2", "--max-length", "16", *common],
    }


if __name__ == "__main__":
    import torch

    from unmerge.cli import main

    torch.set_num_threads(1)
    for argv in commands(Path(sys.argv[1]), sys.argv[2]).values():
        main(argv, standalone_mode=False)
