"""``CrossEncoder``: a PyTerrier transformer that scores (query, document) pairs with any model family.

One scoring path: :meth:`CrossEncoder.scores` returns differentiable scores for the trainer, and
:meth:`CrossEncoder.score_pairs` is the same call under ``torch.inference_mode()`` for ranking.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from pyterrier_kdcl import model_card, models, paths
from pyterrier_kdcl.inputs import RANKLLAMA_TEMPLATE, PairEncoder

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_CHUNK_BATCHES = 64  # tokenize this many batches ahead: enough to sort by length, bounded memory
# Settings that never change a score (how many pairs share a forward pass, progress bars): kept by save(), never part
# of fingerprint(), so a teacher's cached scores survive them. The one place that says so: every other setting, a
# new one included, is part of the identity.
SCORE_NEUTRAL_SETTINGS = frozenset({"batch_size", "verbose"})


class CrossEncoder(pt.Transformer):
    """Reranks a result frame by scoring each (query, document) pair jointly.

    ``model`` is a Hugging Face hub id, a local model directory, or a packaged offline model
    (``"minilm-l6"``, ``"minilm-l3"``, ``"mpnet-base"``, ``"gemma3-270m"``). Encoders score through their
    classification head; decoders and recurrent models through the last token, with the RankLLaMA template
    ``"query: {query} document: {text}"`` and EOS appended.

    Example::

        import pyterrier as pt, pyterrier_kdcl as kdcl
        dataset = pt.get_dataset("irds:kdcl/manpages/test")
        bm25 = kdcl.datasets.bm25("kdcl/manpages/test", num_results=100)
        pipeline = bm25 >> pt.text.get_text(dataset, "text") >> kdcl.CrossEncoder("minilm-l6")

    Args:
        batch_size: pairs per forward pass.
        max_length: tokens per pair. Special tokens, the template's words and EOS always stay; a pair that does not
            fit is cut by tokenizers' ``longest_first`` rule: a query of up to half the remaining tokens is never
            cut, and the document keeps the rest (see :func:`pyterrier_kdcl.inputs.split_budget`).
        template: a prompt with ``{query}`` and ``{text}`` (default: none for encoders, RankLLaMA's for others).
        pooling: ``"classifier"`` (encoder head), ``"last"`` (last real token) or ``"mean"`` (mean of the real
            tokens, through a fresh ``Linear(hidden, 1)``: for encoders pretrained as mean-pooled sentence
            embedders, such as paraphrase-MiniLM-L3-v2); default by architecture.
        lora: ``True``, a dict of ``peft.LoraConfig`` arguments, or a ``LoraConfig``: adds a trainable adapter.
            A fresh head and the adapter are drawn from a fixed seed: two rerankers built with the same arguments
            hold identical weights, whatever ran in between.
        device: default CUDA when available. ``dtype``: default float32 on CPU, bfloat16 on CUDA.
        verbose: progress bars while scoring. Loading is quiet either way: a fresh head is announced in one line
            (a warning of the ``pyterrier_kdcl`` logger, once per model); transformers' load reports, progress bars
            and FutureWarnings show with the environment variable ``KDCL_VERBOSE=1`` (or with transformers'
            verbosity set to INFO).
    """

    optimized: str | None = None  # set by serving.optimize_for_cpu: int8 weights score, but neither save nor train
    # set by a trainer's fit: objective, loss, teacher, steps, best validation, ... (kdcl.json keeps it, the model
    # card shows it); never part of fingerprint(): the weights and settings say what the scores are
    training_facts: dict | None = None

    def __init__(self, model: str | os.PathLike, *, batch_size: int = 32, max_length: int = 256,
                 text_field: str = "text", template: str | None = None, pooling: str | None = None,
                 lora=None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 verbose: bool = True, trust_remote_code: bool = False, _ranker=None, _tokenizer=None):
        self._model = model  # pt.inspect reads every __init__ argument back under its name (or _name)
        self.model_name = str(model)
        self.batch_size = batch_size
        self.text_field = text_field
        self.verbose = verbose
        self.trust_remote_code = trust_remote_code
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source = models.resolve_source(model)
        self.tokenizer = _tokenizer or models.load_tokenizer(source, trust_remote_code)
        if _ranker is None:  # the head and adapter the checkpoint lacks come from a fixed seed: identical starts
            self.ranker = models.build_ranker(source, pooling, self.dtype, trust_remote_code,
                                              pad_token_id=self.tokenizer.pad_token_id, lora=lora,
                                              name=self.model_name)
        elif lora:
            with models.seeded(0):
                self.ranker = models.add_lora(_ranker, lora)
        else:
            self.ranker = _ranker
        self.lora = lora
        # for __repr__: the directory load() read (the tokenizer's source; load passes both _ranker and _tokenizer),
        # and whether it folded a saved adapter into the base
        self._loaded_from = getattr(_tokenizer, "name_or_path", None) if _ranker is not None else None
        self._merged = bool(self._loaded_from) and (Path(self._loaded_from) / models.ADAPTER_DIR).is_dir() \
            and not _has_adapter(self.ranker)
        self.pooling = self.ranker.pooling
        self.ranker.to(self.device).eval()
        if template is None and self.ranker.pooling == "last":
            template = RANKLLAMA_TEMPLATE
        self.template = template
        models.check_max_length(self.ranker, max_length, self.model_name)
        self.max_length = max_length
        self.encoder = PairEncoder(self.tokenizer, max_length, template)

    # -- scoring ---------------------------------------------------------------------------------------------
    def scores(self, queries: list[str], texts: list[str], module: torch.nn.Module | None = None) -> torch.Tensor:
        """Differentiable scores of the pairs, in input order, as one batch (the trainer's call).

        ``module`` is the ranker as wrapped for training (for example by DistributedDataParallel)."""
        batch = self.encoder.collate(self.encoder.encode(queries, texts))
        return (module or self.ranker)(**{k: v.to(self.device) for k, v in batch.items()})

    def score_pairs(self, queries, texts, progress: bool | None = None) -> np.ndarray:
        """Scores of the pairs in input order, batched by length, without gradients."""
        queries, texts = list(queries), list(texts)
        out = np.empty(len(queries), dtype=np.float32)
        chunk = self.batch_size * _CHUNK_BATCHES
        bar = pt.tqdm(total=len(queries), desc=repr(self), unit="pair") if (self.verbose if progress is None
                                                                             else progress) else None
        was_training = self.ranker.training
        self.ranker.eval()
        with torch.inference_mode():
            for start in range(0, len(queries), chunk):
                pairs = self.encoder.encode(queries[start : start + chunk], texts[start : start + chunk])
                for rows, batch in self.encoder.batches_by_length(pairs, self.batch_size):
                    scores = self.ranker(**{k: v.to(self.device) for k, v in batch.items()})
                    out[np.asarray(rows) + start] = scores.cpu().numpy()
                    if bar is not None:
                        bar.update(len(rows))
                _return_freed_memory()
        if bar is not None:
            bar.close()
        self.ranker.train(was_training)
        return out

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        _validate_result_frame(inp, self.text_field, self)
        if len(inp) == 0:
            return pt.model.add_ranks(inp.assign(score=pd.Series(dtype="float64")))
        texts = inp[self.text_field]
        _check_strings(inp["query"], "query", allow_empty=False)  # an empty query ranks by nothing: garbage
        _check_strings(texts, self.text_field)
        out = inp.assign(score=self.score_pairs(inp["query"], texts).astype("float64"))
        out = pt.model.add_ranks(out)
        return out.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the reranker to ``path``: weights (safetensors), tokenizer, ``kdcl.json`` and a model card
        (``README.md`` with Hugging Face metadata and the training facts: :mod:`pyterrier_kdcl.model_card`).

        Atomic: the directory is written under a private temporary name beside ``path`` and swapped in whole, so
        an interruption at any instant leaves the model that was there before, or the new one, and the directory
        is never writable by others (:func:`pyterrier_kdcl.paths.finalized_directory`). Saving over a directory
        that holds anything but an earlier saved reranker is refused rather than deleting it."""
        self.check_float_weights("save")
        path = Path(path)
        _check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with paths.finalized_directory(path, replace=True) as tmp:
            settings = {**self._settings(), **({"training": self.training_facts} if self.training_facts else {})}
            models.save_ranker(self.ranker, self.tokenizer, tmp, settings)
            model_card.write(tmp, self, name=path.name)

    @classmethod
    def load(cls, path: str | os.PathLike, *, merge_lora: bool = False, device=None, dtype=None,
             trust_remote_code: bool = False, **overrides) -> CrossEncoder:
        """Loads what :meth:`save` wrote (never its model card, ``README.md``); ``merge_lora=True`` folds an adapter
        into the base weights.

        A directory saved with ``trust_remote_code=True`` runs code it ships: it loads only when the caller
        passes ``trust_remote_code=True`` too (a downloaded directory cannot switch it on by itself)."""
        path = Path(path)
        aside = paths.interrupted_replacement(path)
        if aside is not None:
            raise FileNotFoundError(f"{path} is missing: a save over it was interrupted, and the model that was there "
                                    f"is complete in {aside}; rename that directory to {path}, or save again")
        settings = models.read_settings(path)
        if settings.get("trust_remote_code") and not trust_remote_code:
            raise ValueError(f"{path} was saved with trust_remote_code=True, so loading it runs Python code from "
                             "the model's files; if you trust them, pass trust_remote_code=True to load()")
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype or settings.get("dtype"), device)
        ranker = models.load_saved_ranker(path, settings, torch_dtype, trust_remote_code)
        if merge_lora:
            ranker = models.merge_lora(ranker)
        kwargs = {k: settings[k] for k in ("batch_size", "max_length", "text_field", "template") if k in settings}
        kwargs.update(overrides)
        tokenizer = models.load_tokenizer(str(path), trust_remote_code)
        reranker = cls(settings.get("model_name", str(path)), device=device, dtype=torch_dtype, _ranker=ranker,
                       _tokenizer=tokenizer, trust_remote_code=trust_remote_code, **kwargs)
        reranker.training_facts = settings.get("training")
        return reranker

    def merge_lora(self) -> CrossEncoder:
        """Folds a LoRA adapter into the base weights in place (for serving); returns self."""
        self._merged = self._merged or _has_adapter(self.ranker)
        self.ranker = models.merge_lora(self.ranker)
        return self

    def fingerprint(self) -> str:
        """A hash of the weights and of the settings that change scores (all but ``SCORE_NEUTRAL_SETTINGS``): two
        rerankers with the same fingerprint score alike, whatever their batch size or verbosity.

        A LoRA adapter folded into its base (``merge_lora``) is another identity than the adapter beside its base:
        its weights are other numbers (``W + BA`` rounded once), and its scores agree with the unmerged model's
        within float tolerance only (in bfloat16, visibly), so a cache filled by one form would hand the other
        scores it does not compute, and a rerun's targets would depend on which form filled it first. Each form is
        scored once; every merged copy of one adapter (``load(merge_lora=True)``, ``merge_lora()``, a merged model
        saved and loaded) shares one identity."""
        self.check_float_weights("fingerprint (a teacher score cache key)")
        settings = {k: v for k, v in self._settings().items() if k not in SCORE_NEUTRAL_SETTINGS}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in sorted(self.ranker.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def check_float_weights(self, action: str) -> None:
        """Refuses ``action`` on a reranker whose weights ``optimize_for_cpu`` turned into int8."""
        if self.optimized is not None:
            raise ValueError(f"{self!r} was optimised for CPU serving ({self.optimized}) and cannot {action}: "
                             "do it with the float checkpoint, then call optimize_for_cpu after loading it")

    def _settings(self) -> dict:
        return {
            "format": 1,
            "model_name": self.model_name,
            "base_model": self.model_name,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "text_field": self.text_field,
            "template": self.template,
            "pad_token_id": self.tokenizer.pad_token_id,
            "dtype": str(self.dtype).replace("torch.", ""),
            "trust_remote_code": self.trust_remote_code,
        }

    def __repr__(self) -> str:
        """What the reranker is, as progress bars and ``pt.Experiment`` show it: where it came from, its adapter, and
        whether it was trained, merged or optimised: ``CrossEncoder('minilm-l6', lora=r8, trained)``,
        ``CrossEncoder.load('runs/kd/model', merged, optimized=bf16)``."""
        source = self.__dict__.get("_loaded_from")
        text = f"CrossEncoder.load({source!r}" if source else f"CrossEncoder({self.model_name!r}"
        rank = _adapter_rank(self.ranker)
        flags = [f"lora=r{rank}" if rank is not None else None, "merged" if self.__dict__.get("_merged") else None,
                 "trained" if self.training_facts else None,
                 f"optimized={self.optimized}" if self.optimized is not None else None]
        return text + "".join(f", {flag}" for flag in flags if flag) + ")"

    def schematic(self, *, input_columns: list[str] | None = None) -> dict:
        """The box of PyTerrier's pipeline drawings; ``help_url`` is set, so drawing never looks it up online."""
        label = "CrossEncoder" if self.optimized is None else f"CrossEncoder ({self.optimized})"
        return {"label": label, "help_url": "docs/guide.md#1-rerank"}


def _check_replaceable(path: Path) -> None:
    """Refuses to save over a file, or over a directory whose files are not an earlier saved reranker."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save the reranker to {path}: it is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not (path / models.KDCL_CONFIG).exists():
        raise FileExistsError(f"cannot save the reranker to {path}: the directory holds files that are not a saved "
                              "reranker (no kdcl.json), which saving would delete; choose another path, or move "
                              "those files away first")


def _has_adapter(ranker) -> bool:
    """``models.has_lora`` without importing peft (a repr of a reranker without LoRA should not load it)."""
    return type(getattr(ranker, "backbone", None)).__module__.startswith("peft")


def _adapter_rank(ranker) -> int | str | None:
    if not _has_adapter(ranker):
        return None
    config = next(iter(getattr(ranker.backbone, "peft_config", {}).values()), None)
    return getattr(config, "r", "?")


def _return_freed_memory() -> None:
    """Gives the pages that glibc's malloc keeps after a chunk back to the system (``malloc_trim``; a no-op
    elsewhere). Nothing in use grows from chunk to chunk, but activations and token lists of ever-different sizes
    leave free holes that malloc keeps: without this, 20,000 pairs peaked 15% above 2,000 (issue 16)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc, or no C library to open (Windows)
        return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a reranker runs on: ``device`` as named, or, for None, CUDA where available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The torch dtype a reranker on ``device`` holds its weights in: ``dtype`` as named, or, for None, bfloat16 on
    a CUDA device that supports it and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _validate_result_frame(inp: pd.DataFrame, text_field: str, context) -> None:
    try:
        pt.validate.result_frame(inp, extra_columns=["query", text_field], context=context)
    except pt.validate.InputValidationError as err:
        missing = [c for c in ["qid", "docno", "query", text_field] if c not in inp.columns]
        hints = []
        if "qid" in missing:
            hints.append("the frame needs a 'qid' column naming each row's query")
        if "docno" in missing:
            hints.append("put a first stage (for example BM25) before the reranker")
        if text_field in missing:
            hints.append(f'add the text with pt.text.get_text(dataset, "{text_field}") before the reranker')
        if "query" in missing:
            hints.append("the frame needs the query text in a 'query' column")
        raise pt.validate.InputValidationError(
            f"{context!r} needs columns {missing} that the input lacks: {'; '.join(hints)}.", err.modes
        ) from None


def _check_strings(column: pd.Series, name: str, allow_empty: bool = True, where: str = "reranking") -> None:
    bad = column.map(lambda v: not isinstance(v, str) or (not allow_empty and not v.strip()))
    if bad.any():
        example = column[bad].iloc[0]
        what = "not a string" if allow_empty else "empty or not a string"
        raise ValueError(
            f"{bad.sum()} rows have a {name!r} that is {what} (for example {example!r}); "
            f"fill or drop them before {where}, e.g. frame.dropna(subset=[{name!r}])"
        )
