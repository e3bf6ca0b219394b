"""A trainer with output_dir holds that directory's lock for the whole fit: a second writer is refused at once."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.directory_lock import DirectoryLocked


def _hold_lock(folder, seconds: float) -> subprocess.Popen:
    """Another process that takes the directory's lock and keeps it, as a second trainer would."""
    code = textwrap.dedent(f"""
        import time
        from pyterrier_kdcl.directory_lock import directory_lock
        with directory_lock({str(folder)!r}):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_on_a_trainers_output_dir_is_refused_and_the_first_keeps_its_files(tiny_model, tmp_path):
    torch.set_num_threads(1)
    res, qrels = training_frames(8)
    out = tmp_path / "run"
    holder = _hold_lock(out, 60)
    try:
        trainer = kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32),
                                          group_size=4, batch_size=4, output_dir=out, verbose=False)
        started = time.monotonic()
        with pytest.raises(DirectoryLocked, match=f"pid {holder.pid}|{holder.pid}") as err:
            trainer.fit(res, qrels)
        assert time.monotonic() - started < 30  # refused at once, not after training
        assert "another output_dir=" in str(err.value)
        assert not (out / "checkpoints").exists()  # nothing of the refused fit was written
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is taken over and the fit runs
    second = kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32),
                                     group_size=4, batch_size=4, output_dir=out, verbose=False)
    assert len(second.fit(res, qrels)) == 2  # 8 queries, 4 a step
