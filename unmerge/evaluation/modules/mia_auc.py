"""Membership-inference AUC (rank-based, ties averaged) of member scores, as an `evaluate` metric.

Load offline by path: evaluate.load(unmerge.evaluation.module_path("mia_auc")).
"""
import datasets
import evaluate
from unmerge.evaluation.forget_quality import auc_with_ci

_DESCRIPTION = """
AUC of member scores (higher = more likely a training member, e.g. minus the loss, or Min-k% Prob) between
members (reference 1, e.g. forget examples) and non-members (reference 0, held-out examples of the same
distribution): P(member scores higher) + 0.5 P(tie), from ranks (Mann-Whitney U). 0.5 = members look unseen.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): member scores.
    references (list of int): 1 for members, 0 for non-members.
    n_boot (int, optional): stratified bootstrap replicates for the interval (default 1000; 0 = none).
    seed (int, optional): bootstrap seed.
Returns:
    auc, ci_low, ci_high, n_members, n_nonmembers.
"""

_CITATION = """
@inproceedings{shi2024detecting, title={Detecting Pretraining Data from Large Language Models},
author={Shi, Weijia and others}, booktitle={ICLR}, year={2024}}
"""


class UnmergeMiaAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("float64"),
                "references": datasets.Value("int64"),
            }),
            reference_urls=["https://arxiv.org/abs/2310.16789"],
        )

    def _compute(self, predictions, references, n_boot=1000, seed=0):
        pos = [p for p, r in zip(predictions, references) if int(r) == 1]
        neg = [p for p, r in zip(predictions, references) if int(r) == 0]
        est = auc_with_ci(pos, neg, n_boot=n_boot, seed=seed)
        return {"auc": est["value"], "ci_low": est["ci_low"], "ci_high": est["ci_high"], "n_members": len(pos),
                "n_nonmembers": len(neg)}
