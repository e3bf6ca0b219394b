"""Which arithmetic a fit computes in: a trainer's ``precision``, ``"auto"`` resolved for the device and the weights.

``"auto"`` is bf16 autocast (over float32 master weights) wherever bfloat16 is native: a CUDA device that supports
it, or a CPU with AMX or AVX512-BF16 (on such a CPU bf16 trained all-MiniLM-L6-v2 1.97x and gemma-3-270m with LoRA
2.8x faster than float32, no worse after the same steps: benchmarks/README.md, 3b). A reranker held in a half
precision computes in it. Elsewhere, and on a CPU whose instruction set is capped below bfloat16 for oneDNN
(``ONEDNN_MAX_CPU_ISA``) or ATen (``ATEN_CPU_CAPABILITY``), where torch would emulate bf16 slower than float32, it is
float32. What ``"auto"`` became is part of a stage's identity (experiment runner) and of the trained model's card.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def check(precision: str) -> None:
    """Refuses a precision that is none of :data:`PRECISIONS` (Accelerate's ``"no"``, float32, is taken too)."""
    if precision not in PRECISIONS and precision != "no":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve(precision: str, device: str | torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: what a fit of a ``dtype`` reranker on ``device`` computes in.

    >>> resolve("fp32", "cpu")
    'fp32'
    >>> resolve("auto", "cpu", torch.bfloat16)
    'bf16'
    """
    check(precision)
    if precision != "auto":
        return "fp32" if precision == "no" else precision
    if dtype in _HALF:  # weights held in half precision compute in it
        return _HALF[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        from pyterrier_kdcl.fast import native_bfloat16

        return "bf16" if native_bfloat16() else "fp32"
    return "fp32"
