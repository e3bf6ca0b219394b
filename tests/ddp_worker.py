"""Trains a tiny reranker and writes its weights; run alone or under torchrun (see test_distributed.py)."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from training_data import training_frames  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402


def main(model_dir: str, out: str) -> None:
    res, qrels = training_frames(16)
    ce = kdcl.CrossEncoder(model_dir, verbose=False, max_length=32, device="cpu")
    for module in ce.ranker.modules():  # dropout masks differ between batch shapes; switch it off to compare
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = kdcl.ContrastiveTrainer(ce, group_size=4, epochs=1, batch_size=4, learning_rate=1e-3, verbose=False)
    trainer.fit(res, qrels)
    rank = int(__import__("os").environ.get("RANK", 0))
    state = {k: v.contiguous() for k, v in ce.ranker.state_dict().items()}
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
