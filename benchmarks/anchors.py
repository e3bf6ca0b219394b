"""sentence-transformers' fast CPU backends, the anchors of ``fast_inference.py``, served from their own environment.

sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers 4.x (the package needs 5.x), so the
anchors run in an environment of their own and ``fast_inference.py --anchors-python ENV/bin/python`` starts this
script there, sends it slices of pairs (pickles on stdin) and reads back (scores, seconds) on stdout::

    python -m venv .venv-anchors && .venv-anchors/bin/pip install torch==2.13.0 "sentence-transformers<6" \\
        optimum-onnx optimum-intel openvino nncf datasets

Anchors, as a user would make them from the same checkpoint (``CrossEncoder(path, backend=...)``):

* ``st-onnx-int8``: ``backend="onnx"`` with ``export_dynamic_quantized_onnx_model`` (ONNX Runtime dynamic int8,
  the configuration for this CPU's instruction set);
* ``st-openvino-int8``: ``backend="openvino"`` with ``export_static_quantized_openvino_model`` (NNCF post-training
  static int8), calibrated on man-page *training* pairs: its default calibration set (GLUE SST-2) is on the Hub,
  which is unreachable here, and in-domain pairs suit a reranker better anyway;
* ``st-openvino``: ``backend="openvino"`` without quantisation (OpenVINO picks bfloat16 itself on CPUs with AMX).
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True, help="a directory for the exported copies")
    parser.add_argument("--calibration", required=True, help="a pickle of (queries, texts) training pairs")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--anchors", nargs="+", default=["st-onnx-int8", "st-openvino-int8", "st-openvino"])
    args = parser.parse_args()
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # stdout carries the answers only
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if not (work / "config.json").exists():
        shutil.copytree(args.model, work, dirs_exist_ok=True)
    with open(args.calibration, "rb") as f:
        calibration = pickle.load(f)
    makers = {"st-onnx-int8": onnx_int8, "st-openvino-int8": lambda w, n: openvino_int8(w, n, calibration),
              "st-openvino": openvino}
    models = {name: makers[name](work, args.max_length) for name in args.anchors}
    pickle.dump(list(models), out)
    out.flush()
    identity = torch.nn.Identity()
    while True:
        try:
            name, queries, texts, batch_size = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        start = time.perf_counter()
        scores = models[name].predict(list(zip(queries, texts)), batch_size=batch_size, show_progress_bar=False,
                                      activation_fn=identity, convert_to_numpy=True)
        pickle.dump((np.asarray(scores, dtype=np.float32).reshape(-1), time.perf_counter() - start), out)
        out.flush()


def instruction_set() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def onnx_int8(work: Path, max_length: int):
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    config = instruction_set()
    name = f"onnx/model_qint8_{config}.onnx"
    if not (work / name).exists():
        export_dynamic_quantized_onnx_model(CrossEncoder(str(work), backend="onnx", max_length=max_length), config,
                                            str(work))
    return CrossEncoder(str(work), backend="onnx", max_length=max_length, model_kwargs={"file_name": name})


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
    return CrossEncoder(str(work), backend="openvino", max_length=max_length, model_kwargs={"file_name": name})


def openvino(work: Path, max_length: int):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(work), backend="openvino", max_length=max_length)


if __name__ == "__main__":
    main()
