"""Validation during training: rerank the validation frame with the current weights, measure with ir_measures."""

from __future__ import annotations

import ir_measures
import pandas as pd

from pyterrier_kdcl.reranker import CrossEncoder, _check_strings
from pyterrier_kdcl.training.groups import _checked_qrels


class Validator:
    """Scores a fixed validation result frame and returns one ir_measures metric (higher is better)."""

    def __init__(self, reranker: CrossEncoder, va_res: pd.DataFrame, va_qrels: pd.DataFrame | None, metric: str):
        if va_qrels is None:
            raise ValueError("validation results were given without validation qrels: pass va_qrels too")
        field = reranker.text_field
        missing = [c for c in ("qid", "query", "docno", field) if c not in va_res.columns]
        if missing:
            raise ValueError(f"the validation frame lacks columns {missing}; it needs a first stage and "
                             f'pt.text.get_text(dataset, "{field}") like the training frame')
        try:
            self.measure = ir_measures.parse_measure(metric)
        except (NameError, ValueError, SyntaxError) as err:
            raise ValueError(f"metric {metric!r} is not an ir_measures measure (e.g. 'nDCG@10', 'RR@10')") from err
        _check_strings(va_res["query"], "query", allow_empty=False, where="validating")
        _check_strings(va_res[field], field, where="validating")
        qrels = _checked_qrels(va_qrels)
        self.reranker = reranker
        self.frame = va_res[["qid", "query", "docno", field]].astype({"qid": str, "docno": str})
        if self.frame.empty:
            raise ValueError("the validation frame is empty: pass va_res=None to train without validation")
        if not self.frame["qid"].isin(set(qrels["qid"])).any():
            # every validation would measure 0 and the "best" weights would be the first ones: refuse
            raise ValueError(f"none of the {self.frame['qid'].nunique()} validation queries has qrels "
                             f"(e.g. qid {self.frame['qid'].iloc[0]!r}): pass the qrels of the validation topics")
        # the mean is over the validation queries: qrels of other queries (a whole split's, with sampled topics)
        # would count as zeros and shrink every figure in the log
        qrels = qrels[qrels["qid"].isin(set(self.frame["qid"]))]
        self.qrels = pd.DataFrame({"query_id": qrels["qid"], "doc_id": qrels["docno"], "relevance": qrels["label"]})

    def evaluate(self) -> float:
        scores = self.reranker.score_pairs(self.frame["query"], self.frame[self.reranker.text_field], progress=False)
        run = pd.DataFrame({"query_id": self.frame["qid"], "doc_id": self.frame["docno"], "score": scores})
        return float(ir_measures.calc_aggregate([self.measure], self.qrels, run).get(self.measure, 0.0))
