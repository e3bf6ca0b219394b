"""Trains a tiny reranker and writes its weights; run alone or under torchrun (see test_distributed.py).

``ddp_worker.py MODEL_DIR OUT [kd]``: with ``kd`` it distils from a teacher (its scores cached in ``OUT/cache``)
and also writes the (query, docno, text) pairs this process's teacher scored, to ``OUT/scored{rank}.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from teacher_worker import WordTeacher  # noqa: E402
from training_data import training_frames  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402


def main(model_dir: str, out: str, objective: str = "cl") -> None:
    res, qrels = training_frames(16)
    ce = kdcl.CrossEncoder(model_dir, verbose=False, max_length=32, device="cpu")
    for module in ce.ranker.modules():  # dropout masks differ between batch shapes; switch it off to compare
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    options = {"group_size": 4, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "verbose": False,
               "precision": "fp32"}  # the comparison is of float sums split over processes: bf16 would blur it
    rank = int(os.environ.get("RANK", 0))
    if objective == "kd":
        teacher = WordTeacher("answer", 2.0)
        trainer = kdcl.DistillationTrainer(ce, teacher, teacher_cache=Path(out) / "cache", **options)
        trainer.fit(res, qrels)
        (Path(out) / f"scored{rank}.json").write_text(json.dumps(teacher.scored))
    else:
        kdcl.ContrastiveTrainer(ce, **options).fit(res, qrels)
    state = {k: v.contiguous() for k, v in ce.ranker.state_dict().items()}
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
