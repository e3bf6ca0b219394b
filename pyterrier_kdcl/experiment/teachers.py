"""Teachers the experiment builds from its config beyond trained cross-encoders, and their fitted temperature.

- ``kind: bi-encoder``: a sentence-transformers model (a packaged short name, a local directory or a hub id)
  scoring each (query, document) row as pyterrier_dr's ``SBertBiEncoder(...).text_scorer()`` does, zero-shot.
- ``teacher_temperature: auto``: the temperature that calibrates the teacher's softmax over a query's validation
  candidates to the validation qrels (:func:`pyterrier_kdcl.training.temperature.fit_temperature`), fitted once
  per teacher. A cosine-similarity teacher gets a small temperature, a logit teacher a large one.

A teacher without a ``fingerprint()`` of its own (the bi-encoder's scorer) has its cached scores named by the
experiment's fingerprint of its settings (the trainer's ``teacher_cache_key``), so they are reused across runs like
a trained teacher's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyterrier as pt

from pyterrier_kdcl.training.temperature import fit_temperature


def bi_encoder_teacher(model: str, *, max_length: int, batch_size: int, verbose: bool = False) -> pt.Transformer:
    """A sentence-transformers bi-encoder as a row scorer (cosine or dot product, as the model was trained)."""
    try:
        from pyterrier_dr import SBertBiEncoder
    except ImportError as err:
        raise ImportError("a bi-encoder teacher needs pyterrier-dr: pip install 'pyterrier-kdcl[experiment]'") from err
    from pyterrier_kdcl.models import resolve_source

    encoder = SBertBiEncoder(resolve_source(model), batch_size=batch_size, verbose=verbose)
    encoder.model.max_seq_length = max_length
    return encoder.text_scorer()


def fitted_temperature(teacher: pt.Transformer, va_res: pd.DataFrame, va_qrels: pd.DataFrame) -> dict:
    """Scores every validation candidate with ``teacher`` and fits the calibrating temperature over each query's
    candidates (queries whose candidates hold no positive are left out). Returns the temperature and its inputs."""
    frame = va_res[["qid", "query", "docno", "text"]].astype({"qid": str, "docno": str})
    scored = teacher(frame)[["qid", "docno", "score"]].astype({"qid": str, "docno": str})
    positives = va_qrels[va_qrels["label"] > 0].astype({"qid": str, "docno": str})
    scored = scored.assign(label=scored.set_index(["qid", "docno"]).index.isin(
        positives.set_index(["qid", "docno"]).index).astype(int))
    depth = int(scored.groupby("qid").size().max())
    rows, labels = [], []
    for _, group in scored.groupby("qid"):
        if group["label"].any():  # pad short lists with -inf scores: they take no probability
            pad = depth - len(group)
            rows.append(np.concatenate([group["score"].to_numpy(dtype="float64"), np.full(pad, -np.inf)]))
            labels.append(np.concatenate([group["label"].to_numpy(), np.zeros(pad, dtype=int)]))
    if not rows:
        raise ValueError("teacher_temperature: auto needs validation queries whose candidates hold a judged "
                         "positive; none do (raise validation.depth or give more validation queries)")
    scores, labels = np.stack(rows), np.stack(labels)
    temperature = fit_temperature(scores, labels)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    return {"temperature": temperature, "queries": len(rows), "depth": depth,
            "score_sd_within_query": float(np.nanmean(np.nanstd(finite, axis=1)))}
