"""Teachers the experiment builds from its config beyond trained cross-encoders, and their fitted temperature.

- ``kind: bi-encoder``: a sentence-transformers model (a packaged short name, a local directory or a hub id)
  scoring each (query, document) row as pyterrier_dr's ``SBertBiEncoder(...).text_scorer()`` does, zero-shot.
- ``kind: fusion``: :class:`~pyterrier_kdcl.fusion.ScoreFusion` of member teachers (and the first stage's own
  score), its statistics and weights fitted once on the validation candidates (:func:`fitted_fusion`). Its
  scores are weighted sums of z-scores: a spread of about 1 within a query, whatever its members' scales.
- ``teacher_temperature: auto``: the temperature that calibrates the teacher's softmax over a query's validation
  candidates to the validation qrels (:func:`pyterrier_kdcl.training.temperature.fit_temperature`), fitted once
  per teacher. A cosine-similarity teacher gets a small temperature, a logit teacher a large one.

A teacher without a ``fingerprint()`` of its own (the bi-encoder's scorer) has its cached scores named by the
experiment's fingerprint of its settings (the trainer's ``teacher_cache_key``), so they are reused across runs like
a trained teacher's.
"""

from __future__ import annotations

import pandas as pd
import pyterrier as pt

from pyterrier_kdcl.fusion import ScoreFusion
from pyterrier_kdcl.training.temperature import fit_teacher_temperature


def bi_encoder_teacher(model: str, *, max_length: int, batch_size: int, dtype: str | None = None,
                       verbose: bool = False) -> pt.Transformer:
    """A sentence-transformers bi-encoder as a row scorer (cosine or dot product, as the model was trained).
    ``dtype`` (``"bf16"``, ``"fp16"``) casts its weights: faster on hardware with native bf16, the scores off by
    the half precision's rounding."""
    try:
        from pyterrier_dr import SBertBiEncoder
    except ImportError as err:
        raise ImportError("a bi-encoder teacher needs pyterrier-dr: pip install 'pyterrier-kdcl[experiment]'") from err
    from pyterrier_kdcl.models import resolve_source

    encoder = SBertBiEncoder(resolve_source(model), batch_size=batch_size, verbose=verbose)
    encoder.model.max_seq_length = max_length
    if dtype is not None:
        from pyterrier_kdcl.reranker import resolve_dtype

        encoder.model.to(resolve_dtype(dtype, encoder.model.device))
    return encoder.text_scorer()


def fitted_temperature(teacher: pt.Transformer, va_res: pd.DataFrame, va_qrels: pd.DataFrame) -> dict:
    """Scores every validation candidate with ``teacher`` and fits the calibrating temperature over each query's
    candidates (:func:`~pyterrier_kdcl.training.temperature.fit_teacher_temperature`). Returns the temperature and
    its inputs."""
    return fit_teacher_temperature(teacher, va_res, va_qrels)


def fitted_fusion(fusion: ScoreFusion, res: pd.DataFrame, qrels: pd.DataFrame, weights: dict | None = None) -> dict:
    """Fits ``fusion``'s member statistics on ``res`` and, unless ``weights`` are given, its weights on the grid
    (maximising its metric against ``qrels``). Returns what was fitted, as JSON: weights, stats, and for fitted
    weights the best value, each member's value alone and the whole grid."""
    queries = int(res["qid"].nunique())
    if weights is not None:
        fusion.fit_statistics(res)
        fusion.weights = {name: float(weights[name]) for name in fusion.scorers}
        return {"weights": fusion.weights, "stats": fusion.stats, "queries": queries}
    grid = fusion.fit(res, qrels)
    metric = fusion.metric
    best = float(grid[metric].max())
    alone = {name: float(grid.loc[grid[name] == 1.0, metric].iloc[0]) for name in fusion.scorers
             if (grid[name] == 1.0).any()}
    return {"weights": fusion.weights, "stats": fusion.stats, "queries": queries, "metric": metric, "value": best,
            "alone": alone, "grid": grid.to_dict("records")}
