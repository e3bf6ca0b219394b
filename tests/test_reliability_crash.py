"""Reliability: a training run killed with SIGKILL at any moment resumes to the weights of an uninterrupted run;
no checkpoint on disk is ever half-written; a read-only or full disk fails before training or keeps the last good
checkpoint.

The killed runs are subprocesses running ``WORKER``; a hook inside the phase to be hit (an optimizer step, a
checkpoint write after the weights file and before the rename, a validation, the deletion of an older
checkpoint) prints a line and waits, and the test kills the process there with SIGKILL. Which occurrence of
each phase is hit is drawn at random (``KDCL_CRASH_SEED`` reproduces a draw).
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyterrier as pt
import pytest
import torch
from safetensors.torch import load_file
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import checkpoints

TESTS = Path(__file__).parent
TRAINING = {"group_size": 4, "epochs": 2, "batch_size": 2, "seed": 5, "learning_rate": 1e-3, "checkpoint_every": 1,
            "validate_every": 2, "metric": "RR@10", "verbose": False, "keep_checkpoints": True}  # compared at the end
N_QUERIES = 12  # 6 steps an epoch, 12 in all

WORKER = """
import collections, json, shutil, sys, time
from pathlib import Path

sys.path.insert(0, {tests!r})
import torch
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import checkpoints, dev_metrics

model_dir, out, phase, at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
seen = collections.Counter()


def pause_if(name):
    seen[name] += 1
    if name == phase and seen[name] == at:
        print(f"KILL ME {{name}} {{at}}", flush=True)
        time.sleep(300)


save_file = checkpoints.save_file
def checkpoint_file(tensors, filename, *args, **kwargs):
    save_file(tensors, filename, *args, **kwargs)
    if Path(filename).name == "weights.safetensors":
        pause_if("checkpoint")  # weights written, optimizer and state not yet, directory not yet renamed
checkpoints.save_file = checkpoint_file

optimizer_step = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    pause_if("step")  # gradients computed, weights about to change
    return optimizer_step(self, *args, **kwargs)
torch.optim.AdamW.step = step

rmtree = shutil.rmtree
def remove(path, *args, **kwargs):
    if phase == "cleanup" and Path(path).name.startswith((".old-", "step-")):
        (Path(path) / "weights.safetensors").unlink(missing_ok=True)
        pause_if("cleanup")  # an older checkpoint half deleted
    return rmtree(path, *args, **kwargs)
shutil.rmtree = remove

evaluate = dev_metrics.Validator.evaluate
def validate(self):
    pause_if("validation")
    return evaluate(self)
dev_metrics.Validator.evaluate = validate

res, qrels = training_frames({n_queries})
ce = kdcl.CrossEncoder(model_dir, verbose=False, max_length=32, device="cpu")
trainer = kdcl.ContrastiveTrainer(ce, output_dir=out, **json.loads({training!r}))
print("TRAINING", flush=True)
trainer.fit(res, qrels, res, qrels, resume=True)
print("DONE", flush=True)
"""


def start(worker, model_dir, out, phase="none", at=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stderr = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, str(worker), str(model_dir), str(out), phase, str(at)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    proc.stderr_file = stderr
    return proc


def wait_for(proc, marker, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(marker):
            return line.strip()
        if not line and proc.poll() is not None:
            proc.stderr_file.seek(0)
            raise AssertionError(f"worker ended (rc {proc.returncode}) before {marker!r}:\n"
                                 f"{proc.stderr_file.read()[-3000:]}")
    proc.kill()
    raise AssertionError(f"worker did not reach {marker!r} in {timeout}s")


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def assert_every_checkpoint_loads(out):
    """Each step-* directory is complete: weights, optimizer state (through weights_only) and state all load."""
    root = out / "checkpoints"
    steps = sorted(p for p in root.iterdir() if p.name.startswith(checkpoints.PREFIX)) if root.exists() else []
    for path in steps:
        assert load_file(path / "weights.safetensors")
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        assert {"optimizer", "scheduler", "rng"} <= set(saved)
        state = json.loads((path / "state.json").read_text())
        assert path.name == f"{checkpoints.PREFIX}{state['step']:08d}"
    return [int(p.name[len(checkpoints.PREFIX):]) for p in steps]


def test_sigkill_during_step_checkpoint_and_validation_then_resume_matches_an_uninterrupted_run(tiny_model,
                                                                                                 tmp_path):
    model_dir = tiny_model("bert")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(TESTS), n_queries=N_QUERIES, training=json.dumps(TRAINING)))
    reference = start(worker, model_dir, tmp_path / "reference")  # runs beside the killed ones (2 cores)

    seed = int(os.environ.get("KDCL_CRASH_SEED", random.randrange(10**6)))
    draw = random.Random(seed)
    # occurrences count from each (re)start, which resumes where the last checkpoint left off
    plan = [("step", draw.randint(2, 5)), ("checkpoint", draw.randint(1, 3)), ("validation", draw.randint(1, 2)),
            ("cleanup", draw.randint(1, 2))]
    out, last = tmp_path / "run", 0
    for phase, at in plan:
        proc = start(worker, model_dir, out, phase, at)
        wait_for(proc, "KILL ME")
        kill(proc)
        steps = assert_every_checkpoint_loads(out)
        assert len(steps) <= 1, (seed, steps)  # old ones go only after a newer one exists
        assert not steps or steps[-1] >= last, (seed, phase, at, steps, last)  # never lose progress
        last = steps[-1] if steps else 0
    assert last < 12, (seed, plan)

    final = start(worker, model_dir, out)
    wait_for(final, "DONE")
    wait_for(reference, "DONE")
    for proc in (final, reference):
        assert proc.wait(timeout=60) == 0

    assert assert_every_checkpoint_loads(out) == [12]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "leftovers"
    for name in ("checkpoints/step-00000012/weights.safetensors", "model/model.safetensors"):
        got, expected = load_file(out / name), load_file(tmp_path / "reference" / name)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (seed, plan, name, key)
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 13 and [r.split(",")[:3] for r in log] == [
        r.split(",")[:3] for r in (tmp_path / "reference" / "log.csv").read_text().splitlines()]


# -- disks that cannot take a checkpoint -----------------------------------------------------------------------
class CountingTeacher(pt.Transformer):
    def __init__(self):
        self.calls = 0

    def transform(self, inp):
        self.calls += 1
        return inp.assign(score=1.0)


def trainer(tiny_model, out, teacher=None, **options):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    options = {"group_size": 4, "batch_size": 2, "verbose": False, "checkpoint_every": 1, "output_dir": out,
               **options}
    if teacher is not None:
        return kdcl.DistillationTrainer(ce, teacher, **options)
    return kdcl.ContrastiveTrainer(ce, **options)


def test_an_output_dir_that_cannot_be_created_fails_before_training(tiny_model, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    teacher = CountingTeacher()
    res, qrels = training_frames(4)
    with pytest.raises(OSError, match=r"output_dir .*a-file/out is not writable.*choose another output_dir"):
        trainer(tiny_model, tmp_path / "a-file" / "out", teacher).fit(res, qrels)
    assert teacher.calls == 0


def test_a_read_only_output_dir_fails_before_training(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores permission bits: make the write itself fail as EROFS would
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(checkpoints.tempfile, "NamedTemporaryFile", read_only)
    teacher = CountingTeacher()
    res, qrels = training_frames(4)
    try:
        with pytest.raises(OSError, match="is not writable"):
            trainer(tiny_model, out, teacher).fit(res, qrels)
    finally:
        out.chmod(0o755)
    assert teacher.calls == 0 and not (out / "checkpoints").exists()


def test_too_little_free_space_fails_before_training(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1024))
    teacher = CountingTeacher()
    res, qrels = training_frames(4)
    with pytest.raises(OSError, match=r"has 0\.0 GiB free, but a checkpoint needs about"):
        trainer(tiny_model, tmp_path / "out", teacher).fit(res, qrels)
    assert teacher.calls == 0


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_good_one_and_resume_finishes(tiny_model, tmp_path,
                                                                                            monkeypatch):
    res, qrels = training_frames(8)
    reference = trainer(tiny_model, tmp_path / "reference")
    reference.fit(res, qrels)

    real_save_file, writes = checkpoints.save_file, []

    def filling(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == 3:  # the third checkpoint: half the file reaches the disk, then ENOSPC
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", filling)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"No space left.*step-00000002 is kept.*resume=True") as err:
        trainer(tiny_model, out).fit(res, qrels)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # no half-written leftovers
    assert assert_every_checkpoint_loads(out) == [2]

    monkeypatch.setattr(checkpoints, "save_file", real_save_file)
    resumed = trainer(tiny_model, out)
    resumed.fit(res, qrels, resume=True)
    expected = reference.reranker.ranker.state_dict()
    for key, value in resumed.reranker.ranker.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_step_already_on_disk_is_never_deleted_to_be_rewritten(tiny_model, tmp_path):
    res, qrels = training_frames(4)
    done = trainer(tiny_model, tmp_path / "out", keep_checkpoints=True)
    done.fit(res, qrels)
    path = tmp_path / "out" / "checkpoints" / "step-00000002"
    before = path.stat().st_ino
    optimizer = torch.optim.AdamW(done.reranker.ranker.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    again = checkpoints.save(tmp_path / "out", done.reranker.ranker, optimizer, scheduler,
                             checkpoints.TrainingState(step=2))
    assert again == path and path.stat().st_ino == before
    assert assert_every_checkpoint_loads(tmp_path / "out") == [2]
