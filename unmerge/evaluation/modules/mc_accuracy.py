"""Multiple-choice accuracy of a causal LM by log-likelihood of each choice given the prompt, as an
`evaluate` metric (sum and token-length-normalized variants).

Load offline by path: evaluate.load(unmerge.evaluation.module_path("mc_accuracy")).
"""
import datasets
import evaluate
from unmerge.evaluation.accuracy import multiple_choice_accuracy

_DESCRIPTION = """
Each example is a prompt, its choices and the index of the right choice. A choice's score is the sum of its
token log-probabilities given the prompt (accuracy.sum) or that sum divided by its number of tokens
(accuracy.norm); the prediction is the highest-scoring choice.
"""

_KWARGS_DESCRIPTION = """
Args:
    prompts (list of str): the prompts.
    choices (list of list of str): the choices of each prompt (write them with their leading space).
    references (list of int): index of the correct choice.
    model: a transformers causal LM; tokenizer: its tokenizer.
    normalize (bool, optional): which variant "accuracy" reports (default False: sum).
    batch_size (int, optional), n_boot (int, optional), seed (int, optional).
Returns:
    accuracy, accuracy.sum, accuracy.norm (each with .ci_low / .ci_high), n, predictions_sum, predictions_norm.
"""

_CITATION = ""


class UnmergeMCAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "prompts": datasets.Value("string"),
                "choices": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Value("int64"),
            }),
            reference_urls=["https://github.com/EleutherAI/lm-evaluation-harness"],
        )

    def _compute(self, prompts, choices, references, model=None, tokenizer=None, normalize=False, batch_size=16,
                 max_length=None, n_boot=1000, seed=0, progress=False):
        if model is None or tokenizer is None:
            raise ValueError("pass model= and tokenizer= to compute()")
        items = [{"prompt": p, "choices": list(c), "label": int(r)} for p, c, r in zip(prompts, choices, references)]
        metrics, records = multiple_choice_accuracy(model, tokenizer, items, normalize=normalize,
                                                    batch_size=batch_size, max_length=max_length, n_boot=n_boot,
                                                    seed=seed, progress=progress)
        result = {}
        for name, est in metrics.items():
            result[name] = est["value"]
            result[name + ".ci_low"] = est["ci_low"]
            result[name + ".ci_high"] = est["ci_high"]
        result["n"] = len(items)
        result["predictions_sum"] = [r["pred_sum"] for r in records]
        result["predictions_norm"] = [r["pred_norm"] for r in records]
        return result
