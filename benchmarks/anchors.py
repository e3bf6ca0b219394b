"""The anchors of ``fast_inference.py``: fast CPU backends (sentence-transformers', ONNX Runtime, CTranslate2).

sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers 4.x (the package needs 5.x), so the
anchors run in an environment of their own and ``fast_inference.py --anchors-python ENV/bin/python`` starts this
script there, sends it slices of pairs (pickles on stdin) and reads back (scores, seconds) on stdout::

    python -m venv .venv-anchors && .venv-anchors/bin/pip install torch==2.13.0 "sentence-transformers<6" \\
        optimum-onnx optimum-intel openvino nncf datasets ctranslate2 onnxruntime

Anchors, as a user would make them from the same checkpoint (``CrossEncoder(path, backend=...)``):

* ``st-onnx-int8``: ``backend="onnx"`` with ``export_dynamic_quantized_onnx_model`` (ONNX Runtime dynamic int8,
  the configuration for this CPU's instruction set);
* ``st-openvino-int8``: ``backend="openvino"`` with ``export_static_quantized_openvino_model`` (NNCF post-training
  static int8), calibrated on man-page *training* pairs: its default calibration set (GLUE SST-2) is on the Hub,
  which is unreachable here, and in-domain pairs suit a reranker better anyway;
* ``st-openvino``: ``backend="openvino"`` without quantisation (OpenVINO picks bfloat16 itself on CPUs with AMX).

Anchors as ways we could serve the checkpoint ourselves:

* ``ort-fused``: ONNX Runtime in float32 on the export ``backend="onnx"`` makes, after optimum's graph fusions
  (``export_optimized_onnx_model(..., "O2")``: ``ORTOptimizer`` at level O2, i.e. ``onnxruntime.transformers``'
  BERT fusions of attention, GELU and LayerNorm where its patterns match; the fused operators are printed);
* ``ct2-int8``: CTranslate2's BERT encoder with int8 weights (``TransformersConverter``, ``quantization="int8"``,
  run as ``int8_float32``), scored by the checkpoint's own classifier (read from its safetensors) on the pooled
  output CTranslate2 returns: the logit ``BertForSequenceClassification`` computes. BERT checkpoints only.

Every anchor tokenises as sentence-transformers does: the checkpoint's tokenizer on whole pairs, ``longest_first``
truncation to ``--max-length`` (the ids kdcl's pre-cut also gives), batches in order of decreasing length.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ANCHORS = ["st-onnx-int8", "st-openvino-int8", "st-openvino", "ort-fused", "ct2-int8"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True, help="a directory for the exported copies")
    parser.add_argument("--calibration", required=True, help="a pickle of (queries, texts) training pairs")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--anchors", nargs="+", choices=ANCHORS, default=ANCHORS)
    args = parser.parse_args()
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # stdout carries the answers only
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if not (work / "config.json").exists():
        shutil.copytree(args.model, work, dirs_exist_ok=True)
    with open(args.calibration, "rb") as f:
        calibration = pickle.load(f)
    makers = {"st-onnx-int8": onnx_int8, "st-openvino-int8": lambda w, n: openvino_int8(w, n, calibration),
              "st-openvino": openvino, "ort-fused": ort_fused, "ct2-int8": lambda w, n: ct2_int8(w, n, args.threads)}
    models = {name: makers[name](work, args.max_length) for name in args.anchors}
    pickle.dump(list(models), out)
    out.flush()
    while True:
        try:
            name, queries, texts, batch_size = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        start = time.perf_counter()
        scores = models[name](queries, texts, batch_size)
        pickle.dump((np.asarray(scores, dtype=np.float32).reshape(-1), time.perf_counter() - start), out)
        out.flush()


def predictor(model):
    """(queries, texts, batch_size) -> logits of a sentence-transformers ``CrossEncoder`` (no activation)."""
    identity = torch.nn.Identity()

    def score(queries, texts, batch_size):
        return model.predict(list(zip(queries, texts)), batch_size=batch_size, show_progress_bar=False,
                             activation_fn=identity, convert_to_numpy=True)

    return score


def instruction_set() -> str:
    """The quantisation configuration for this CPU, or ``avx2`` under fast_inference.py's ``--emulate-avx2`` (ONNX
    Runtime itself cannot be capped: it still runs its kernels for the whole instruction set)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        return "avx2"
    flags = Path("/proc/cpuinfo").read_text()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def onnx_int8(work: Path, max_length: int):
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    config = instruction_set()
    name = f"onnx/model_{'quint8' if config == 'avx2' else 'qint8'}_{config}.onnx"  # what the export writes
    if not (work / name).exists():
        export_dynamic_quantized_onnx_model(CrossEncoder(str(work), backend="onnx", max_length=max_length), config,
                                            str(work))
    return predictor(CrossEncoder(str(work), backend="onnx", max_length=max_length, model_kwargs={"file_name": name}))


def openvino_int8(work: Path, max_length: int, calibration):
    import datasets
    from optimum.intel import OVQuantizationConfig, OVQuantizer
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_static_quantized_openvino_model

    name = "openvino/openvino_model_qint8_quantized.xml"
    if not (work / name).exists():
        model = CrossEncoder(str(work), backend="openvino", max_length=max_length)
        queries, texts = calibration
        encoded = model.tokenizer(list(queries), list(texts), padding="max_length", max_length=max_length,
                                  truncation=True)
        pairs = datasets.Dataset.from_dict(dict(encoded))
        OVQuantizer.get_calibration_dataset = lambda self, *a, **k: pairs  # the Hub's SST-2 is out of reach
        export_static_quantized_openvino_model(model, OVQuantizationConfig(num_samples=len(pairs)), str(work))
    return predictor(CrossEncoder(str(work), backend="openvino", max_length=max_length,
                                  model_kwargs={"file_name": name}))


def openvino(work: Path, max_length: int):
    from sentence_transformers import CrossEncoder

    return predictor(CrossEncoder(str(work), backend="openvino", max_length=max_length))


def ort_fused(work: Path, max_length: int):
    import onnx
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_optimized_onnx_model

    name = "onnx/model_O2.onnx"
    if not (work / name).exists():
        export_optimized_onnx_model(CrossEncoder(str(work), backend="onnx", max_length=max_length), "O2", str(work))
    ops = Counter(node.op_type for node in onnx.load(str(work / name), load_external_data=False).graph.node)
    fused = {op: ops[op] for op in ("Attention", "MultiHeadAttention", "SkipLayerNormalization",
                                    "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu") if ops[op]}
    print(f"ort-fused: fused operators {fused or 'none'}; {sum(ops.values())} nodes")
    return predictor(CrossEncoder(str(work), backend="onnx", max_length=max_length, model_kwargs={"file_name": name}))


def ct2_int8(work: Path, max_length: int, threads: int):
    import ctranslate2
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    architectures = AutoConfig.from_pretrained(str(work)).architectures
    if architectures != ["BertForSequenceClassification"]:
        raise SystemExit(f"ct2-int8 reads a BERT classifier head; {work} holds {architectures}: leave ct2-int8 out")
    converted = work / "ctranslate2-int8"
    if not (converted / "model.bin").exists():
        converter = ctranslate2.converters.TransformersConverter(str(work))
        converter.convert(str(converted), quantization="int8", force=True)  # force: over a half-written copy
    encoder = ctranslate2.Encoder(str(converted), device="cpu", compute_type="int8_float32", intra_threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(str(work))
    with safe_open(str(work / "model.safetensors"), "np") as f:
        weight, bias = f.get_tensor("classifier.weight"), f.get_tensor("classifier.bias")

    def score(queries, texts, batch_size):
        order = np.argsort([-len(q) - len(t) for q, t in zip(queries, texts)], kind="stable")
        scores = np.empty(len(order), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = tokenizer([queries[i] for i in rows], [texts[i] for i in rows], truncation="longest_first",
                                max_length=max_length)
            pooled = encoder.forward_batch(encoded["input_ids"], token_type_ids=encoded["token_type_ids"]).pooler_output
            scores[rows] = (np.asarray(pooled) @ weight.T + bias)[:, 0]  # dropout is off at inference
        return scores

    return score


if __name__ == "__main__":
    main()
