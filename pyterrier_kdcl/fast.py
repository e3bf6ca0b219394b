"""The fast CPU path: :func:`optimize_for_cpu` turns a float32 ``CrossEncoder`` into a faster one, in place.

Three methods, each keeping the reranker's one scoring path (``score_pairs``/``transform`` call the same ``ranker``
module, swapped), and ``"auto"``, the default, which picks the first or the second for the CPU it runs on:

* ``"bf16"`` (``auto``'s choice where the CPU computes bfloat16 natively: Intel AMX or AVX512-BF16, Sapphire
  Rapids and later, AMD Zen 4 and later): weights and activations in bfloat16, the one-logit scoring head in
  float32. Nothing is scaled per batch, and each pair runs through matrix products and an attention width that its
  batch mates do not change (:class:`FixedRowsLinear`, :class:`FixedWidths`), so its score does not depend on
  them; how it ranks against float32 is measured in ``benchmarks/README.md``. Elsewhere torch emulates bfloat16 and
  it is slower than float32.
* ``"int8-rows"`` (``auto``'s choice elsewhere, e.g. on AVX2-only CPUs): int8 linear layers whose activations get
  one scale per row (per token), as CTranslate2 does (:class:`RowInt8Linear`): integer sums are exact, so a row's
  result depends on that row alone, and with :class:`FixedWidths` a pair's score does not depend on its batch mates.
* ``"int8"``: dynamic int8 quantisation of the linear layers (``torch.ao.quantization.quantize_dynamic``).
  Activations get one scale per batch, so a pair's score moves with its batch mates (by up to 1.3 on scores with
  sd 2.1 in the benchmark): kept for comparison, not for comparing or caching scores.

What it never does: an optimised reranker is for inference only — train and save the float32 model, and optimise
after loading it (``optimize_for_cpu(CrossEncoder.load(path))``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from pyterrier_kdcl import models
from pyterrier_kdcl.reranker import CrossEncoder

OPTIMIZATIONS = ("auto", "bf16", "int8-rows", "int8")
logger = logging.getLogger(__name__)
# where benchmarks/fast_inference.py --record wrote that the bf16 method ranks as float32 (model -> figures)
EQUIVALENCE_FILE = Path(__file__).with_name("fast_equivalence.json")
# feed-forward output projections, where int8 hurts most: BERT/MiniLM/ELECTRA/MPNet/RoBERTa (not attention.output),
# DistilBERT, and Llama/Qwen/Gemma-style decoders
FFN_OUTPUT = r"(layer\.\d+\.output\.dense|\.ffn\.lin2|\.mlp\.down_proj)$"
_WIDTH_STEP = 32  # pairs run at their length rounded up to this (see FixedWidths)
_INT8_TOKENS = 2_048  # int8-rows: tokens a forward call holds at most (FixedWidths: 8 pairs of 256 tokens)
_ROWS = 256  # rows per bfloat16 matrix product of a 2-D input (a padded last block): one shape for every row
_SEQUENCES = 8  # sequences per bfloat16 matrix product of a 3-D input (2,048 rows at width 256)
_HEAD_FEATURES = 16  # a linear layer with fewer outputs is a scoring head: it stays float32 (it costs nothing)
# int8-rows: activations as unsigned 8 bits around 128 (one scale per row), weights in 7 bits (-63..63, one scale per
# output channel). CPUs without VNNI (AVX2) sum pairs of u8 x s8 products in saturating 16 bits: 255 x 63 x 2 stays
# below 32,767, so the integer sums are exact on every x86 CPU (8-bit weights overflow there: test_fast_int8.py)
_ACTIVATION_LEVELS, _WEIGHT_LEVELS = 127, 63
_WORKSPACE = threading.local()  # RowInt8Linear's normalised inputs, one buffer a thread (see _workspace)
_BY_METHOD = "<the method's default>"  # keep_float: FFN_OUTPUT for "int8", nothing for "int8-rows"


def optimize_for_cpu(reranker: CrossEncoder, method: str = "auto", *,
                     keep_float: str | None = _BY_METHOD) -> CrossEncoder:
    """Makes ``reranker`` faster on CPU, in place, and returns it; ``reranker.optimized`` (and its repr) says which
    method ran.

    ``method="auto"`` (default) picks ``"bf16"`` where :func:`native_bfloat16` is true and ``"int8-rows"`` elsewhere
    (and logs which, on the ``pyterrier_kdcl.fast`` logger at INFO). Both are batch-independent: a pair's score does
    not depend on the other pairs in its batch, so scores can be compared and cached.

    ``method="bf16"`` runs the model in bfloat16 with a float32 scoring head: no activation is scaled per batch, and
    every pair runs through the same shapes whatever its batch mates. Speed, nDCG@10 against float32, Kendall's tau
    and batch dependence are measured in ``benchmarks/README.md`` (a MiniLM trained on the man pages, 2 cores). It is
    fast only on CPUs that compute bfloat16 natively (Intel AMX or AVX512-BF16; AMD Zen 4 and later): elsewhere it
    works, but torch emulates bfloat16 and it is slower than float32 (a warning says so).

    ``method="int8-rows"``: the linear layers in int8 (fbgemm), weights with one scale per output channel, each
    activation row (token) with its own scale, computed from that row alone; the sums are exact integers, so a row's
    result does not depend on the other rows, and pairs run at widths set by their own lengths, in forward calls of
    at most 2,048 tokens (:class:`FixedWidths`: small activations, no fresh memory pages each call). For CPUs without
    native bfloat16 (AVX2, AVX-512 without BF16). Measured under AVX2 emulation on a MiniLM-L6
    (``benchmarks/README.md``, section 2): 1.68-1.80x float32 end to end on 2 cores; nDCG@10 −0.0010 against
    float32 over 500 queries, though single scores moved by up to 1.1 (int8 rounding): check effectiveness on your
    data.

    ``method="int8"``: dynamic int8 quantisation (``torch.ao.quantization.quantize_dynamic``, weights per output
    channel). Its activations are quantised with one scale per batch, so a pair's int8 score moves with the other
    pairs in its batch (by up to 1.3 on scores with sd 2.1 in the benchmark): do not compare or cache its scores;
    ``int8-rows`` is the batch-independent int8.

    Scores change a little either way (rounding). A LoRA adapter is merged first. The reranker can no longer be
    trained or saved: keep the float32 checkpoint and optimise after loading it.

    Example::

        reranker = optimize_for_cpu(kdcl.CrossEncoder.load("my-reranker", device="cpu"))
        reranker.optimized   # "bf16" on a CPU with native bfloat16, "int8-rows" elsewhere
        pipeline = bm25 >> pt.text.get_text(dataset, "text") >> reranker

    Args:
        method: ``"auto"``, ``"bf16"``, ``"int8-rows"`` or ``"int8"``.
        keep_float: int8 methods only: a regular expression; linear layers whose module name it matches stay
            float32. ``"int8"`` keeps ``FFN_OUTPUT`` by default, the feed-forward output projections: their input
            (the GELU output) has outlier channels that one int8 scale per batch cannot resolve. ``"int8-rows"``
            quantises every layer by default (those projections are a third of the linear layers' arithmetic).
            ``None`` quantises every layer.
    """
    if not isinstance(reranker, CrossEncoder):
        raise TypeError(f"optimize_for_cpu needs a kdcl.CrossEncoder, got {type(reranker).__name__}")
    if method not in OPTIMIZATIONS:
        raise ValueError(f"method must be one of {OPTIMIZATIONS}, got {method!r}")
    if method == "bf16" and keep_float != _BY_METHOD:
        raise ValueError("keep_float chooses the layers that int8 leaves in float32: pass method='int8-rows' or "
                         "'int8' with it (the bfloat16 method runs every layer in bfloat16 but the scoring head)")
    if reranker.device.type != "cpu":
        raise ValueError(
            f"optimize_for_cpu is for CPU, but {reranker!r} is on {reranker.device}; on a GPU load it in "
            "bfloat16 instead: kdcl.CrossEncoder.load(path, dtype='bf16')"
        )
    if is_optimized(reranker):
        if method not in ("auto", reranker.optimized):
            raise ValueError(f"{reranker!r} is already optimised ({reranker.optimized}); load the float32 "
                             f"checkpoint again to optimise it with {method!r}")
        return reranker
    if reranker.dtype != torch.float32:
        raise ValueError(f"optimize_for_cpu starts from float32 weights; {reranker!r} is {reranker.dtype}: "
                         "load it with dtype='fp32'")
    if method == "auto":
        method = auto_method()
        logger.info("optimize_for_cpu: method='auto' chose %r (%s)", method, _auto_reason(method))
        if method == "bf16" and keep_float != _BY_METHOD:
            raise ValueError("keep_float applies to the int8 methods, and method='auto' chose 'bf16' on this CPU: "
                             "pass method='int8-rows' with keep_float, or leave keep_float out")
    if method.startswith("int8") and not int8_supported():
        raise ValueError(f"method={method!r} needs torch's fbgemm int8 kernels (x86-64 CPUs), and this torch has "
                         f"quantized engines {torch.backends.quantized.supported_engines}: use method='bf16'")
    if keep_float == _BY_METHOD:
        keep_float = FFN_OUTPUT if method == "int8" else None
    if models.has_lora(reranker.ranker):
        reranker.merge_lora()
    ranker = reranker.ranker.eval()
    if method == "bf16":
        reranker.ranker = FixedWidths(_bfloat16(ranker), limit=reranker.max_length)
    elif method == "int8-rows":
        reranker.ranker = FixedWidths(_row_int8(ranker, keep_float, reranker), limit=reranker.max_length,
                                      tokens=_INT8_TOKENS)
    else:
        reranker.ranker = _int8(ranker, keep_float, reranker)
    reranker.ranker.requires_grad_(False)
    reranker.optimized = method
    return reranker


def auto_method() -> str:
    """The method ``optimize_for_cpu(method="auto")`` picks here: ``"bf16"`` where the CPU computes bfloat16 natively
    (:func:`native_bfloat16`), else ``"int8-rows"`` (``"bf16"`` where torch has no fbgemm int8 kernels)."""
    return "bf16" if native_bfloat16() or not int8_supported() else "int8-rows"


def _auto_reason(method: str) -> str:
    """Why ``auto`` chose ``method`` on this CPU, for the log."""
    if method == "bf16":
        return "this CPU computes bfloat16 natively (AMX or AVX512-BF16)" if native_bfloat16() else \
            "no fbgemm int8 kernels in this torch; bfloat16 is emulated here and may be slower than float32"
    hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    caps = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    capped = hardware and any(name in os.environ for name in caps)
    where = "no native bfloat16 here: " + ("the CPU has it, but ONEDNN_MAX_CPU_ISA or ATEN_CPU_CAPABILITY caps it"
                                           if capped else "no AMX or AVX512-BF16, so bfloat16 would be slower than "
                                           "float32")
    return f"{where}; int8 with one activation scale per row, {_INT8_TOKENS:,} tokens a forward call"


def int8_supported() -> bool:
    """Whether torch's fbgemm int8 kernels are here (x86-64 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def is_optimized(reranker: CrossEncoder) -> bool:
    """Whether :func:`optimize_for_cpu` has been applied (such a reranker scores, but neither trains nor saves)."""
    return getattr(reranker, "optimized", None) is not None


def equivalence_shown(model: str) -> dict | None:
    """The benchmark's figures for ``model`` (a packaged short name such as ``"minilm-l6"``) if it showed that the
    default fast method ranks as float32 does on a checkpoint of that model (nDCG@10 difference within 0.005, its
    95% interval inside 0.01, Kendall's tau >= 0.95, batch dependence <= 1e-3); else None."""
    entries = json.loads(EQUIVALENCE_FILE.read_text()) if EQUIVALENCE_FILE.exists() else {}
    return entries.get(model)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX tiles or AVX512-BF16), and neither oneDNN's
    nor ATen's instruction set is capped below them (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``:
    how the tests emulate a CPU without them, and how a user pins a computation to older CPUs)."""
    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return False
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "default").lower()
    return (onednn in ("ALL", "DEFAULT") or any(name in onednn for name in ("BF16", "FP16", "AMX", "AVX10"))) \
        and aten in ("default", "avx512", "")


class Float32Head(nn.Module):
    """A scoring head kept in float32 inside a bfloat16 model: its input is cast up, so scores keep float32's
    resolution (a bfloat16 score of 5 would move in steps of 0.03, and near ties would become ties)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear.float()

    @property
    def weight(self) -> torch.Tensor:  # LastTokenRanker casts its input to the head's dtype
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())


class FixedRowsLinear(nn.Module):
    """A bfloat16 linear layer that multiplies a fixed number of rows at a time, the last block padded with zeros.

    oneDNN's bfloat16 matrix product blocks its sum over the input features by the number of rows it is given
    (seen for the 1,536 inputs of MiniLM's feed-forward output), so a row's result changed in the last bit with
    its batch mates, and bfloat16 rounding carried that to the score (0.01 on scores with sd 3). Every row now
    goes through a product of the same shape: the same sum in the same order, whatever else is in the batch.
    A block holds ``sequences`` sequences of the input's width (which :class:`FixedWidths` sets from each pair's
    own length), or ``rows`` rows of a 2-D input: large blocks, since every product is a parallel region whose
    threads all wait for the slowest (256-row blocks ran at a third of float32's speed on a loaded machine).
    """

    def __init__(self, linear: nn.Linear, rows: int = _ROWS, sequences: int = _SEQUENCES):
        super().__init__()
        self.weight, self.bias, self.rows, self.sequences = linear.weight, linear.bias, rows, sequences

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n, rows = flat.shape[0], self.sequences * x.shape[-2] if x.dim() == 3 else self.rows
        out = flat.new_empty(n, self.weight.shape[0])
        weight = self.weight.t()
        for start in range(0, n - n % rows, rows):
            _product(flat[start : start + rows], weight, self.bias, out[start : start + rows])
        if n % rows:
            tail = flat.new_zeros(rows, flat.shape[1])
            tail[: n % rows] = flat[n - n % rows :]
            out[n - n % rows :] = _product(tail, weight, self.bias)[: n % rows]
        return out.reshape(*x.shape[:-1], -1)


class RowInt8Linear(nn.Module):
    """An int8 linear layer whose activations get one scale per row: a row's result depends on that row alone.

    Weights are quantised once, symmetrically, with one scale per output channel (7 bits: see ``_WEIGHT_LEVELS``).
    Each row of the input is divided by its own largest magnitude, so every row spans [-1, 1] and one fixed
    quantisation (8 bits around 128) fits them all; fbgemm's int8 product (``quantized::
    linear_with_input_q_dq_qweight_dq_output_fp32``) sums exactly in integers; the result is multiplied back by the
    row's scale and the float32 bias added. Nothing depends on the other rows, unlike ``quantize_dynamic``'s one
    scale per batch. CTranslate2 quantises its int8 activations the same way.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (weight.abs().amax(dim=1) / _WEIGHT_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
        with warnings.catch_warnings():  # the quantised-tensor functions are deprecated, fbgemm's packing is not
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long),
                                                 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # the largest magnitude as the larger of max and -min: two reductions without a temporary (vector_norm with
        # ord=inf and aminmax were each over ten times slower in a probe on one AVX2-capped thread)
        scale = torch.maximum(flat.amax(dim=1, keepdim=True), flat.amin(dim=1, keepdim=True).neg_())
        scale = scale.clamp_min_(torch.finfo(x.dtype).tiny)
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            torch.div(flat, scale, out=_workspace(flat)), 1 / _ACTIVATION_LEVELS, _ACTIVATION_LEVELS + 1, self._packed)
        # in place: a fresh tensor this large costs page faults, more than the arithmetic (a probe: about ten times)
        out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale, out=out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _workspace(like: torch.Tensor) -> torch.Tensor:
    """A float32 tensor shaped as ``like``, reused by this thread's int8-rows layers: the normalised input of one
    layer lives only until its product, and a fresh tensor of tens of MB is paid for again in page faults."""
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < like.numel():
        buffer = _WORKSPACE.buffer = torch.empty(like.numel(), dtype=torch.float32)
    return buffer[: like.numel()].view(like.shape)


class FixedWidths(nn.Module):
    """Runs a ranker on sub-batches of fixed widths: each pair padded to a width set by its own length alone.

    Attention sums over a batch's padded width, and a different width changes the sum's last bit (padded keys
    weigh zero, but the blocks of the sum move); bfloat16 rounding carries that to the score. A pair of ``n``
    tokens is always run at ``n`` rounded up to a multiple of ``step`` (at most ``limit``), whatever its batch
    mates' lengths, at the cost of a few padded tokens.

    With ``tokens``, a sub-batch holds at most ``tokens`` tokens (sequences x width; at least one sequence), so
    that every activation of one call stays small: at 2,048 tokens MiniLM's widest (2,048 x 1,536 float32, 12.6 MB)
    is reused heap memory, under glibc's 32 MB limit for fresh pages, and partly in cache. A batch of 32 pairs of
    256 tokens made 50 MB activations that cost more in page faults than their arithmetic (int8-rows ran 1.2-1.3x
    faster in sub-batches of 8 pairs under AVX2 caps, ``benchmarks/README.md``). Only for layers whose rows do not
    depend on each other (int8-rows): a bfloat16 or float32 product may block its sum by the rows it is given.
    """

    def __init__(self, ranker: nn.Module, limit: int, step: int = _WIDTH_STEP, tokens: int | None = None):
        super().__init__()
        self.ranker, self.limit, self.step, self.tokens = ranker, limit, step, tokens
        self.pooling = ranker.pooling

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1)
        widths = torch.clamp((lengths + self.step - 1) // self.step * self.step, max=max(self.limit, lengths.max()))
        scores = torch.empty(len(lengths), dtype=torch.float32, device=input_ids.device)
        for width in widths.unique().tolist():
            group = (widths == width).nonzero().squeeze(1)
            size = max(1, self.tokens // width) if self.tokens else len(group)
            for rows in group.split(size):
                parts = [_width(t[rows], width) if t is not None else None
                         for t in (input_ids, attention_mask, token_type_ids)]
                scores[rows] = self.ranker(*parts)
        return scores


def _width(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or right-pad (with zeros: masked positions) to ``width`` columns."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    return nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def _product(x, weight, bias, out=None):
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)


def _heads(ranker: nn.Module) -> list[str]:
    return [name for name, module in ranker.named_modules()
            if isinstance(module, nn.Linear) and module.out_features < _HEAD_FEATURES]


def _bfloat16(ranker: nn.Module) -> nn.Module:
    if not native_bfloat16():
        warnings.warn("this CPU has no native bfloat16 (AMX or AVX512-BF16): optimize_for_cpu(method='bf16') ranks "
                      "as float32 does but may run slower than float32 here; measure, or use method='int8-rows' (or "
                      "'auto', which picks it on such CPUs)", stacklevel=3)
    heads = set(_heads(ranker))
    layers = [name for name, module in ranker.named_modules() if isinstance(module, nn.Linear)]
    ranker.to(torch.bfloat16)
    for name in layers:
        parent, _, child = name.rpartition(".")
        owner = ranker.get_submodule(parent) if parent else ranker
        linear = getattr(owner, child)
        setattr(owner, child, Float32Head(linear) if name in heads else FixedRowsLinear(linear))
    return ranker


def _row_int8(ranker: nn.Module, keep_float: str | None, reranker: CrossEncoder) -> nn.Module:
    targets = _int8_targets(ranker, keep_float, reranker)
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = ranker.get_submodule(parent) if parent else ranker
        setattr(owner, child, RowInt8Linear(getattr(owner, child)))
    return ranker


def _int8_targets(ranker: nn.Module, keep_float: str | None, reranker: CrossEncoder) -> set[str]:
    heads = set(_heads(ranker))
    targets = {name for name, module in ranker.named_modules()
               if isinstance(module, nn.Linear) and name not in heads
               and not (keep_float and re.search(keep_float, name))}
    if not targets:
        raise ValueError(f"{reranker!r} has no linear layers to quantise")
    return targets


def _int8(ranker: nn.Module, keep_float: str | None, reranker: CrossEncoder) -> nn.Module:
    targets = _int8_targets(ranker, keep_float, reranker)
    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, but its fbgemm kernels are still the
        # fastest CPU int8 path in torch 2.13 without compiling: torchao's per-token int8 ran at 0.5-0.7x float32
        # eager (benchmarks/README.md)
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        # one weight scale per output channel: a third of the per-tensor error on a trained MiniLM, same speed
        spec = dict.fromkeys(targets, torch.ao.quantization.per_channel_dynamic_qconfig)
        return torch.ao.quantization.quantize_dynamic(ranker, spec, dtype=torch.qint8, inplace=True)
