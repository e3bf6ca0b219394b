"""Two CPU processes under torchrun (gloo, DDP through Accelerate) train like one process with the same batch,
and share the teacher's scoring between them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, *args], check=True, cwd=cwd, env=env, timeout=600)


def free_port() -> int:
    with socket.socket() as s:  # a fixed port collides with another test run on the same machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_and_ddp(model_dir, tmp_path, *args):
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    run([str(WORKER), model_dir, str(tmp_path / "single"), *args], tmp_path)
    run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(WORKER), model_dir,
         str(tmp_path / "ddp"), *args], tmp_path)
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    return single, ranks


def assert_ddp_matches_single(model_dir, single, ranks):
    initial = {f"model.{k}": v for k, v in load_file(Path(model_dir) / "model.safetensors").items()}
    update = torch.cat([(single[k] - initial[k]).flatten() for k in single if k in initial])
    gap = torch.cat([(ranks[0][k] - single[k]).flatten() for k in single if k in initial])
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], atol=0, rtol=0)  # replicas stay in sync
    # AdamW divides by the gradient's own scale, so float noise in near-zero gradients shows up at the size of
    # the learning rate in single elements; the update as a whole must agree
    assert update.norm() > 1e-2
    assert gap.norm() / update.norm() < 0.02, (gap.norm(), update.norm())


def test_two_process_ddp_matches_single_process(tiny_model, tmp_path):
    model_dir = str(tiny_model("bert"))
    single, ranks = single_and_ddp(model_dir, tmp_path)
    assert_ddp_matches_single(model_dir, single, ranks)


def test_two_processes_share_the_teachers_scoring_and_distil_like_one(tiny_model, tmp_path):
    from pyterrier_kdcl.training.teachers import ScoreStore, pair_key

    model_dir = str(tiny_model("bert"))
    single, ranks = single_and_ddp(model_dir, tmp_path, "kd")
    assert_ddp_matches_single(model_dir, single, ranks)
    alone = {tuple(p) for p in json.loads((tmp_path / "single" / "scored0.json").read_text())}
    shares = [[tuple(p) for p in json.loads((tmp_path / "ddp" / f"scored{r}.json").read_text())] for r in (0, 1)]
    # each process scored its half of the pairs, and both trained on all the scores
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == alone
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    (directory,) = [d for d in (tmp_path / "ddp" / "cache").iterdir() if d.is_dir()]
    store = ScoreStore(directory)
    assert len(store) == len(alone) and len(store.get([pair_key(*p) for p in alone])) == len(alone)


def test_deepspeed_megatron_and_fsdp1_are_refused_before_anything_runs(tiny_model, monkeypatch):
    """The trainer gathers the whole model for validation, best weights, checkpoints and the saved model through
    FSDP version 2 (test_fsdp.py); DeepSpeed, Megatron-LM and FSDP version 1 are refused, pointing to it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from teacher_worker import WordTeacher
    from training_data import training_frames

    import pyterrier_kdcl as kdcl
    from pyterrier_kdcl.training import trainer as trainer_module

    res, qrels = training_frames(4)
    cases = ((DistributedType.DEEPSPEED, None, "set up for DEEPSPEED.*--use_fsdp --fsdp_version 2"),
             (DistributedType.MEGATRON_LM, None, "set up for MEGATRON_LM.*--fsdp_version 2"),
             (DistributedType.FSDP, 1, "FSDP version 1.*--fsdp_version 2"))
    for kind, version, expected in cases:
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
        monkeypatch.setattr(trainer_module, "_accelerator", lambda *a, kind=kind, state=state, **k: SimpleNamespace(
            distributed_type=kind, num_processes=2, state=state))
        teacher = WordTeacher("answer", 1.0)
        trainer = kdcl.DistillationTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False), teacher,
                                           group_size=4, verbose=False)
        with pytest.raises(ValueError, match=expected):
            trainer.fit(res, qrels)
        assert teacher.scored == []
