"""Toxicity of generations (mean, expected maximum, probability, share > 0.8) with bootstrap intervals over
prompts, as an `evaluate` measurement.

Load offline by path: evaluate.load(unmerge.evaluation.module_path("toxicity"), module_type="measurement").
"""
import datasets
import evaluate
from unmerge.evaluation.scorers import get_scorer
from unmerge.evaluation.toxicity import toxicity_metrics

_DESCRIPTION = """
Toxicity metrics of generated texts. predictions are either texts (scored with the named scorer:
profanity-check, detoxify:<variant or checkpoint>, hf:<model>[@label]) or scores already computed.
prompt_ids groups generations by prompt (default: each generation is its own prompt).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str, or list of float): generations, or their toxicity scores in [0, 1].
    prompt_ids (list, optional): the prompt of each generation.
    scorer (str, optional): scorer name for text predictions (default "profanity-check").
    n_boot (int, optional): bootstrap replicates (default 1000).
    seed (int, optional): bootstrap seed (default 0).
Returns:
    for each of toxicity.mean, toxicity.expected_max, toxicity.probability, toxicity.share_gt_0.8 the value,
    plus "<name>.ci_low" and "<name>.ci_high"; "scores" (one per prediction); "n_prompts".
"""

_CITATION = ""


class UnmergeToxicity(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Value("float64")}),
            ],
            reference_urls=["https://arxiv.org/abs/2009.11462"],
        )

    def _compute(self, predictions, prompt_ids=None, scorer="profanity-check", n_boot=1000, seed=0):
        if predictions and isinstance(predictions[0], str):
            scores = get_scorer(scorer)(predictions)
        else:
            scores = [float(s) for s in predictions]
        if prompt_ids is None:
            prompt_ids = list(range(len(scores)))
        if len(prompt_ids) != len(scores):
            raise ValueError("prompt_ids must have one entry per prediction")
        table = {"prompt_id": list(prompt_ids), "score": scores}
        metrics = toxicity_metrics(table, n_boot=n_boot, seed=seed)
        result = {}
        for name, est in metrics.items():
            result[name] = est["value"]
            result[name + ".ci_low"] = est["ci_low"]
            result[name + ".ci_high"] = est["ci_high"]
        result["n_prompts"] = metrics["toxicity.mean"]["n"]
        result["scores"] = scores
        return result
