"""Model name or path → tokenizer + scoring module, for every family; LoRA; save and load.

Three scoring modules share one call, ``ranker(**batch) -> scores (batch,)`` in float32, used unchanged by
inference and by training:

* :class:`ClassifierRanker` — encoder models (BERT, MiniLM, ELECTRA, MPNet, RoBERTa, …) through their own
  sequence-classification head with one logit. Checkpoints saved by sentence-transformers' ``CrossEncoder``
  load as they are and give the same logits as that library.
* :class:`LastTokenRanker` — decoder LLMs (Qwen, Gemma, Llama) and recurrent models (Mamba): the hidden state
  of the last *real* token (found through the attention mask, so neither the pad id nor the padding side
  matters) through a ``Linear(hidden, 1)`` head called ``score``, as in RankLLaMA and RankMamba.
* :class:`MeanTokenRanker` — the same head on the mean of the real tokens' hidden states (``pooling="mean"``),
  for encoders pretrained as mean-pooled sentence embedders.

Saved directories hold safetensors only, plus ``kdcl.json`` describing how to rebuild the ranker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

KDCL_CONFIG = "kdcl.json"
HEAD_FILE = "score_head.safetensors"
ADAPTER_DIR = "adapter"
RECURRENT_TYPES = {"mamba", "mamba2", "falcon_mamba"}
# RankLLaMA's recipe (Tevatron): r=8, alpha=64, dropout 0.1 on every linear layer of the transformer blocks.
DEFAULT_LORA = {"r": 8, "lora_alpha": 64, "lora_dropout": 0.1, "target_modules": "all-linear"}
VERBOSE_ENV = "KDCL_VERBOSE"  # "1": loads show transformers' and peft's own reports, progress bars and warnings

logger = logging.getLogger("pyterrier_kdcl")
_ANNOUNCED_HEADS: set[str] = set()


class ClassifierRanker(nn.Module):
    """An encoder's own sequence-classification head with one logit."""

    pooling = "classifier"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, 0].float()


class LastTokenRanker(nn.Module):
    """Score = ``Linear(hidden, 1)`` on the hidden state of the last token whose attention mask is 1."""

    pooling = "last"

    def __init__(self, backbone: nn.Module, score: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.score = score

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1).float()

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MeanTokenRanker(LastTokenRanker):
    """Score = ``Linear(hidden, 1)`` on the mean hidden state of the tokens whose attention mask is 1.

    For encoders pretrained as mean-pooled sentence embedders (sentence-transformers' paraphrase and all-* models),
    whose ``[CLS]`` output no loss ever shaped: Lightning IR's ``pooling_strategy="mean"``.
    """

    pooling = "mean"

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


HEAD_RANKERS = {ranker.pooling: ranker for ranker in (LastTokenRanker, MeanTokenRanker)}
POOLINGS = ("classifier", *HEAD_RANKERS)


# -- quiet loading -------------------------------------------------------------------------------------------
def verbose_loading() -> bool:
    """Whether loads show transformers' own output: with ``KDCL_VERBOSE=1``, or when the user has set transformers'
    verbosity to INFO or DEBUG (``transformers.logging.set_verbosity_info()``, ``TRANSFORMERS_VERBOSITY=info``)."""
    from transformers.utils import logging as hf_logging

    requested = os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    return requested or hf_logging.get_verbosity() < logging.WARNING


@contextlib.contextmanager
def quiet_loading():
    """For the duration of a load (or save) only, silences what transformers and peft print meanwhile: the load
    report (``classifier.bias | MISSING … Consider training…``), the "Loading weights" and "Writing model shards"
    bars, and FutureWarnings and DeprecationWarnings about their own APIs. Errors still raise; the settings in
    force before come back after. On request (:func:`verbose_loading`) transformers reports at WARNING or below."""
    from transformers.utils import logging as hf_logging

    verbose = verbose_loading()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(min(verbosity, logging.WARNING) if verbose else logging.ERROR)
    if not verbose:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _quietly(function):
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with quiet_loading():
            return function(*args, **kwargs)

    return quiet


def _announce_new_head(name: str, weights: list[str], seed: int) -> None:
    """One line, once per model and process, in place of transformers' load report: a fresh head is expected."""
    if name in _ANNOUNCED_HEADS:
        return
    _ANNOUNCED_HEADS.add(name)
    logger.warning("%s has no reranking head: a new one (%s) was initialised from seed %d. Expected for a model you "
                   "are about to train; its scores mean nothing until then", name, ", ".join(weights), seed)


# -- building ------------------------------------------------------------------------------------------------
def resolve_source(model: str | os.PathLike) -> str:
    """A short offline name (``minilm-l6``) → its local directory; paths and hub ids pass through.

    The short names thus serve any library that loads Hugging Face directories::

        SBertBiEncoder(resolve_source("minilm-l6")).text_scorer()   # pyterrier_dr's bi-encoder
    """
    model = str(model)
    if not os.path.exists(model):
        from pyterrier_kdcl.offline import packaged_models

        if packaged_models.is_offline_model(model):
            return str(packaged_models.resolve_offline_model(model))
        problem = packaged_models.misspelled_model(model)
        if problem is not None:  # at once, not after the Hub's retries
            raise ValueError(f"cannot load model: {problem}")
    return model


def default_pooling(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type} is an encoder-decoder model; cross-encoders need an encoder or decoder")
    if config.model_type in RECURRENT_TYPES or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "last"
    return "classifier"


@_quietly
def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        _check_local_model_dir(source)  # a saved LoRA reranker has a tokenizer but no config.json: check only now
        if isinstance(err, ValueError):
            raise
        raise _not_found(source, err) from err
    if tokenizer.pad_token is None:  # Llama, Gemma base and Mamba tokenizers may lack one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_ranker(source: str, pooling: str | None = None, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False, pad_token_id: int | None = None, lora=None,
                 seed: int = 0, name: str | None = None) -> nn.Module:
    """Loads weights from a hub id or a local Hugging Face directory into the scoring module, with a LoRA adapter
    when ``lora`` is given (see :func:`lora_config`).

    What the checkpoint lacks (a fresh head, the adapter's ``lora_A`` matrices) is drawn from ``seed``, whatever
    the global RNG, which is left as it was: two rerankers built with the same arguments hold the same weights, so
    a CL student and a KD student differ only in how they are trained.

    Loading is quiet (:func:`quiet_loading`); a fresh head is announced instead, once per model (``name``, by
    default ``source``) and process, as one warning of the ``pyterrier_kdcl`` logger.
    """
    ranker, new_head = _seeded_build(source, pooling, dtype, trust_remote_code, pad_token_id, lora, seed)
    if new_head:
        _announce_new_head(name or source, new_head, seed)
    return ranker


@_quietly
def _seeded_build(source, pooling, dtype, trust_remote_code, pad_token_id, lora, seed):
    with seeded(seed):
        ranker, new_head = _build_ranker(source, pooling, dtype, trust_remote_code, pad_token_id)
        return (add_lora(ranker, lora) if lora else ranker), new_head


@contextlib.contextmanager
def seeded(seed: int):
    """Draws inside come from ``seed``; the global CPU RNG is left as it was (models are built on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_ranker(source, pooling, dtype, trust_remote_code, pad_token_id) -> tuple[nn.Module, list[str]]:
    """The scoring module, and the names of the head weights the checkpoint lacked (initialised afresh)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = _load_config(source, trust_remote_code)
    pooling = pooling or default_pooling(config)
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id  # Qwen's own classification head reads the first pad token otherwise
    kwargs = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if pooling == "classifier":
        config.num_labels = 1
        model, new_head = _from_pretrained(AutoModelForSequenceClassification, source, kwargs)
        return ClassifierRanker(model), new_head
    if pooling not in HEAD_RANKERS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
    head_ranker = HEAD_RANKERS[pooling]
    head_path = Path(source) / HEAD_FILE
    if head_path.exists() or pooling != "last" or not _has_classification_head(config):
        backbone, _ = _from_pretrained(AutoModel, source, kwargs)
        if not head_path.exists():
            score = nn.Linear(config.hidden_size, 1, dtype=dtype)
            _init_head(score, config)
            return head_ranker(backbone, score), ["score.weight", "score.bias"]
        head = load_file(head_path)  # a head kept from a checkpoint's own (Qwen2ForSequenceClassification): no bias
        score = nn.Linear(config.hidden_size, 1, bias="bias" in head, dtype=dtype)
        score.load_state_dict(head)
        return head_ranker(backbone, score), []
    # an existing decoder reranker (e.g. Qwen2ForSequenceClassification): reuse its trunk and its head
    config.num_labels = 1
    model, new_head = _from_pretrained(AutoModelForSequenceClassification, source, kwargs)
    return LastTokenRanker(model.base_model, model.score), new_head


_HEAD_PARTS = {"classifier", "pre_classifier", "pooler", "score", "head"}  # may be new: training fits them


def is_head_parameter(name: str) -> bool:
    """Whether a parameter (a ``named_parameters()`` name of a ranker) belongs to the scoring head: the encoder's
    pooler and classifier, or the ``score`` layer, also inside a LoRA wrapper."""
    return bool(_HEAD_PARTS & set(name.split(".")))


def _from_pretrained(auto_class, source: str, kwargs: dict) -> tuple[nn.Module, list[str]]:
    """``from_pretrained`` that refuses a checkpoint lacking trunk weights (transformers only warns, then scores
    with random weights: a checkpoint from another architecture than its config.json names). Returns the model
    and the names of the head weights the checkpoint lacked."""
    from safetensors import SafetensorError

    try:
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise OSError(f"the weights in {source} are unreadable ({err}): the file is truncated or corrupt; "
                      "download or save the model again") from err
    new_head = sorted(k for k in info["missing_keys"] if is_head_parameter(k))
    missing = sorted(k for k in info["missing_keys"] if not is_head_parameter(k))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} weights of its {kwargs['config'].model_type} architecture are not in the "
            f"checkpoint (e.g. {', '.join(missing[:3])}); the weights belong to another architecture or are "
            "incomplete. Re-download or re-save the model, or fix config.json")
    return model, new_head


def _load_config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    _check_local_model_dir(source)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _not_found(source, err) from err


def _check_local_model_dir(source: str) -> None:
    """A local path that is not a Hugging Face model directory gets a message about the path, not about the Hub."""
    path = Path(source)
    if path.is_file():
        raise OSError(f"{source} is a file: pass the directory that holds config.json and the weights")
    if not path.is_dir() or (path / "config.json").exists():
        return
    if (path / KDCL_CONFIG).exists():
        raise OSError(f"{source} is a reranker saved by pyterrier_kdcl: load it with "
                      f"kdcl.CrossEncoder.load({source!r})")
    if (path / "adapter_config.json").exists():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise OSError(f"{source} holds a LoRA adapter without its base model ({base!r}); pyterrier_kdcl loads "
                      "adapters only inside a reranker saved by CrossEncoder.save (its kdcl.json names the base)")
    raise OSError(f"{source} is not a Hugging Face model directory (it has no config.json); pass a directory "
                  "written by save_pretrained, a hub id, or a reranker saved by CrossEncoder.save via .load()")


def _not_found(source: str, err: Exception) -> OSError:
    from pyterrier_kdcl.offline.packaged_models import OFFLINE_MODELS

    return OSError(
        f"cannot load model {source!r}: not a local model directory, and the Hugging Face Hub did not serve it "
        f"({err}). Use a directory that holds config.json, or a packaged model: {', '.join(OFFLINE_MODELS)}."
    )


def max_positions(ranker: nn.Module) -> int | None:
    """Tokens an encoder with learned absolute positions can read; None where positions do not run out."""
    model = ranker.backbone.get_base_model() if has_lora(ranker) else ranker.backbone
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    if not isinstance(positions, nn.Embedding):
        return None
    padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa and MPNet count positions from padding_idx + 1
    return positions.num_embeddings - (padding_idx + 1 if padding_idx is not None else 0)


def check_max_length(ranker: nn.Module, max_length: int, name: str) -> None:
    limit = max_positions(ranker)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} is longer than the {limit} positions {name} can read; "
                         f"use max_length={limit} or less (longer documents are truncated)")


def _has_classification_head(config) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def _init_head(score: nn.Linear, config) -> None:
    nn.init.normal_(score.weight, std=getattr(config, "initializer_range", 0.02))
    nn.init.zeros_(score.bias)


# -- LoRA ----------------------------------------------------------------------------------------------------
def lora_config(lora, ranker: nn.Module):
    """``True``, a dict of ``peft.LoraConfig`` arguments or a ``LoraConfig`` → a ``LoraConfig``.

    For Mamba, "all-linear" becomes in_proj and x_proj: peft refuses out_proj and conv1d, and Mamba's scan reads
    ``dt_proj.weight`` directly, so an adapter there would train nothing and change scores when merged.
    """
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        config = lora
    else:
        config = LoraConfig(**{**DEFAULT_LORA, **(lora if isinstance(lora, dict) else {})})
    if ranker.backbone.config.model_type in RECURRENT_TYPES and config.target_modules == "all-linear":
        config.target_modules = {"in_proj", "x_proj"}  # see lora_config
    if isinstance(ranker, ClassifierRanker) and config.task_type is None:
        config.task_type = "SEQ_CLS"  # peft then trains and saves the classifier head with the adapter
    return config


def add_lora(ranker: nn.Module, lora) -> nn.Module:
    """Wraps the trunk in a peft adapter. Its ``lora_A`` matrices come from the global RNG: :func:`build_ranker`
    seeds them."""
    from peft import get_peft_model

    config = lora_config(lora, ranker)
    if isinstance(ranker, ClassifierRanker):
        return ClassifierRanker(get_peft_model(ranker.model, config))
    return type(ranker)(get_peft_model(ranker.backbone, config), ranker.score)


def has_lora(ranker: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(ranker.backbone, PeftModel)


@_quietly
def merge_lora(ranker: nn.Module) -> nn.Module:
    """Folds the adapter into the base weights: faster inference, same scores within float tolerance."""
    if not has_lora(ranker):
        return ranker
    merged = ranker.backbone.merge_and_unload()
    return ClassifierRanker(merged) if isinstance(ranker, ClassifierRanker) else type(ranker)(merged, ranker.score)


# -- saving and loading --------------------------------------------------------------------------------------
@_quietly
def save_ranker(ranker: nn.Module, tokenizer, path: Path, settings: dict) -> None:
    """Writes weights (safetensors), tokenizer and ``kdcl.json``; with LoRA only the adapter and head."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    if has_lora(ranker):
        ranker.backbone.save_pretrained(path / ADAPTER_DIR, safe_serialization=True)
    else:
        ranker.backbone.save_pretrained(path, safe_serialization=True)
    if isinstance(ranker, LastTokenRanker):
        save_file({k: v.detach().contiguous().cpu() for k, v in ranker.score.state_dict().items()}, path / HEAD_FILE)
    settings = {**settings, "pooling": ranker.pooling, "lora": has_lora(ranker)}
    (path / KDCL_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True))


def read_settings(path: Path) -> dict:
    config_file = Path(path) / KDCL_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(
            f"{path} is not a saved pyterrier_kdcl reranker (no {KDCL_CONFIG}); "
            "to load a Hugging Face model directory use kdcl.CrossEncoder(path) instead"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is corrupt ({err}); save the reranker again") from err


@_quietly
def load_saved_ranker(path: Path, settings: dict, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Rebuilds a ranker written by :func:`save_ranker`; a LoRA ranker rebuilds its base and attaches the adapter
    with the head it was trained with (the base's fresh head is replaced, so it is not announced)."""
    if not settings.get("lora"):
        return build_ranker(str(path), settings["pooling"], dtype, trust_remote_code)
    from peft import PeftModel

    base_model = settings["base_model"]
    try:
        base, _ = _seeded_build(resolve_source(base_model), settings["pooling"], dtype, trust_remote_code,
                                settings.get("pad_token_id"), None, 0)
    except (OSError, ValueError) as err:
        raise OSError(f"{path} holds a LoRA adapter whose base model {base_model!r} cannot be loaded ({err}). Put "
                      f"the base model back, or set base_model in {path / KDCL_CONFIG} to where it is now") from err
    adapter = path / ADAPTER_DIR
    try:
        if isinstance(base, ClassifierRanker):
            return ClassifierRanker(PeftModel.from_pretrained(base.model, adapter, is_trainable=True))
        base.score.load_state_dict(load_file(path / HEAD_FILE))
        return type(base)(PeftModel.from_pretrained(base.backbone, adapter, is_trainable=True), base.score)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"the LoRA adapter in {path} does not fit its base model {base_model!r} "
                         f"({type(err).__name__}: {err}); base_model in {path / KDCL_CONFIG} names another model "
                         "than the one it was trained on") from err
