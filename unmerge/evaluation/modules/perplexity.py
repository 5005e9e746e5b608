"""Corpus-level strided sliding-window perplexity of a causal LM, as an `evaluate` metric.

Load offline by path: evaluate.load(unmerge.evaluation.module_path("perplexity")).
"""
import datasets
import evaluate
from unmerge.evaluation.perplexity import corpus_perplexity
from unmerge.evaluation.perplexity import per_document_perplexity

_DESCRIPTION = """
Corpus perplexity (unmerge protocol): the texts are joined with a blank line and tokenized once; windows of
max_length tokens start every stride tokens; each token is scored once, with the preceding window tokens as
context; PPL = exp(total NLL / scored tokens). With per_document=True the mean of per-document perplexities
(the `evaluate` perplexity convention) is returned as well, under a different key.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the documents.
    model: a transformers causal LM (already loaded, on its device).
    tokenizer: its tokenizer.
    max_length (int, optional): window length; default the model context capped at 1024.
    stride (int, optional): window step; default max_length // 2.
    batch_size (int, optional): windows per forward pass (default 4).
    per_document (bool, optional): also return "perplexity.per_doc_mean".
Returns:
    perplexity, nll_sum, n_scored, n_tokens, max_length, stride, n_windows, n_documents, overflow
    (and perplexity.per_doc_mean, per_doc when per_document=True).
"""

_CITATION = ""


class UnmergePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, model=None, tokenizer=None, max_length=None, stride=None, batch_size=4,
                 per_document=False, progress=False):
        if model is None or tokenizer is None:
            raise ValueError("pass model= and tokenizer= to compute()")
        result = corpus_perplexity(model, tokenizer, predictions, max_length=max_length, stride=stride,
                                   batch_size=batch_size, progress=progress)
        if per_document:
            result.update(per_document_perplexity(model, tokenizer, predictions, max_length=result["max_length"],
                                                  batch_size=batch_size, progress=progress))
        return result
