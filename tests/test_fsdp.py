"""FSDP (version 2, through Accelerate) on two CPU processes (gloo): the fit saves one full model, which
``kdcl.CrossEncoder.load`` reads and which scores like the same fit in one process; LoRA too; checkpoints hold the
whole model and a resumed fit reads them; DeepSpeed is refused with a pointer to FSDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")


def fsdp_run(model_dir: str, out: Path) -> None:
    from test_distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_FSDP": "true",
           "FSDP_VERSION": "2", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                               os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", str(WORKER), model_dir, str(out)],
                   check=True, cwd=out, env=env, timeout=600)


def scores(out: Path, name: str) -> list[np.ndarray]:
    return [np.array(json.loads((out / name / f"scores{r}.json").read_text())) for r in (0, 1)]


def centred(values: np.ndarray) -> np.ndarray:
    # InfoNCE never moves a score head's bias (a shift of every score changes no softmax), so AdamW steps it on
    # float noise, by about the learning rate, differently in one process and in two: compare what ranks documents
    return values - values.mean()


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The worker once in this process and once under FSDP on two processes."""
    import fsdp_worker

    model_dir = str(tiny_model("qwen2"))
    single, fsdp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    try:
        fsdp_worker.main(model_dir, str(single))
    finally:
        torch.set_num_threads(threads)
    fsdp_run(model_dir, fsdp)
    return model_dir, single, fsdp


@pytest.mark.parametrize("name", ["full", "lora"])
def test_fsdp_saves_one_full_model_that_loads_and_scores_like_one_process(runs, name):
    import fsdp_worker

    import pyterrier_kdcl as kdcl

    model_dir, single, fsdp = runs
    ranks = scores(fsdp, name)
    np.testing.assert_allclose(ranks[0], ranks[1], atol=1e-6)  # every process holds the whole trained model
    loaded = kdcl.CrossEncoder.load(fsdp / name / "model", verbose=False)
    assert "trained" in repr(loaded) and (("lora=" in repr(loaded)) == (name == "lora"))
    from_disk = loaded.score_pairs(*fsdp_worker.PROBE)
    np.testing.assert_allclose(from_disk, ranks[0], atol=1e-6)  # the saved model is the trained one
    alone = kdcl.CrossEncoder.load(single / name / "model", verbose=False).score_pairs(*fsdp_worker.PROBE)
    lora = fsdp_worker.LORA if name == "lora" else None
    fresh = kdcl.CrossEncoder(model_dir, verbose=False, lora=lora).score_pairs(*fsdp_worker.PROBE)
    change = np.abs(centred(alone) - centred(fresh)).max()
    assert change > 1e-3  # training moved the scores
    assert np.abs(centred(from_disk) - centred(alone)).max() < 0.05 * change


def test_fsdp_full_weights_match_one_process_and_no_shard_is_saved(runs):
    model_dir, single, fsdp = runs
    initial = load_file(Path(model_dir) / "model.safetensors")
    saved, alone = (load_file(d / "full" / "model" / "model.safetensors") for d in (fsdp, single))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in alone.items()}  # whole, not a shard
    update = torch.cat([(alone[k] - initial[k]).flatten() for k in initial])
    gap = torch.cat([(saved[k] - alone[k]).flatten() for k in initial])
    assert update.norm() > 1e-2 and gap.norm() / update.norm() < 0.02, (gap.norm(), update.norm())
    # the kept checkpoint holds whole weights and the optimizer's whole state, keyed by parameter name
    (checkpoint,) = (fsdp / "full" / "checkpoints").iterdir()
    weights = load_file(checkpoint / "weights.safetensors")
    assert {k.removeprefix("backbone."): v.shape for k, v in weights.items() if k.startswith("backbone.")} == \
        {k: v.shape for k, v in alone.items()}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert optimizer["sharded"] and set(optimizer["optimizer"]["state"]) == set(weights)
    assert all(s["exp_avg"].shape == weights[k].shape for k, s in optimizer["optimizer"]["state"].items())


def test_a_resumed_fsdp_fit_reads_the_whole_checkpoint(runs):
    _, _, fsdp = runs
    full, resumed = scores(fsdp, "full"), scores(fsdp, "resumed")
    np.testing.assert_allclose(resumed[0], full[0], atol=1e-6)
    np.testing.assert_allclose(resumed[1], full[1], atol=1e-6)
