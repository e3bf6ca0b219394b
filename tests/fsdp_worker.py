"""Trains a tiny decoder reranker with LoRA and in full, writing each to ``OUT/{lora,full}/model``, then resumes
the full fit from its last checkpoint; run alone or under torchrun with ``ACCELERATE_USE_FSDP=true FSDP_VERSION=2``
(see test_fsdp.py).

``fsdp_worker.py MODEL_DIR OUT``: every process also writes the scores its trained reranker gives :data:`PROBE` to
``OUT/{lora,full,resumed}/scores{rank}.json`` (each process must hold the whole model after a fit).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_data import training_frames  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
PROBE = (["read a file"] * 3, ["the answer to read", "a page on how to copy", "close a file descriptor"])


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    res, qrels = training_frames(8)
    va_res, va_qrels = training_frames(4)
    rank = int(os.environ.get("RANK", 0))
    options = {"group_size": 4, "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0, "verbose": False,
               "precision": "fp32"}  # the comparison is of float sums split over processes: bf16 would blur it
    # validation after every step (best weights gathered); LoRA under FSDP
    trainer = kdcl.ContrastiveTrainer(kdcl.CrossEncoder(model_dir, verbose=False, max_length=32, lora=LORA),
                                      validate_every=1, output_dir=Path(out) / "lora", **options)
    trainer.fit(res, qrels, va_res, va_qrels)
    write_scores(trainer, Path(out) / "lora", rank)
    # a checkpoint after every step, kept; then a resumed fit finds the last one and trains no further
    for name, resume in (("full", False), ("resumed", True)):
        trainer = kdcl.ContrastiveTrainer(kdcl.CrossEncoder(model_dir, verbose=False, max_length=32),
                                          checkpoint_every=1, keep_checkpoints=True, resume=resume,
                                          output_dir=Path(out) / "full", **options)
        trainer.fit(res, qrels)
        write_scores(trainer, Path(out) / name, rank)


def write_scores(trainer, directory: Path, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    scores = trainer.reranker.score_pairs(*PROBE, progress=False)
    (directory / f"scores{rank}.json").write_text(json.dumps(scores.tolist()))


if __name__ == "__main__":
    main(*sys.argv[1:])
