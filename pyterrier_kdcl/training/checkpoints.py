"""Training checkpoints that survive a crash at any moment.

Each checkpoint is a directory ``checkpoints/step-NNNNNNNN`` written under a temporary name and renamed into
place in one ``os.replace`` (``pt.io.finalized_directory``), so a directory with that name is always complete;
the newest one is the one to resume from, and older ones are removed only after a newer one exists. A finished
fit removes them all (:func:`remove_all`) once its model is saved, unless it keeps them. Weights are
safetensors (trainable parameters only: a LoRA checkpoint holds the adapter and head); optimizer and scheduler
state go through ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyterrier_kdcl import paths

PREFIX = "step-"


@dataclass
class TrainingState:
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    seconds: float = 0.0
    pairs: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    log: list[dict] = field(default_factory=list)
    best_weights: dict | None = field(default=None, repr=False)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def check_writable(output_dir: Path, needed_bytes: int = 0) -> None:
    """Fails before training starts when checkpoints could not be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(f"output_dir {output_dir} is not writable ({err}); choose another output_dir") from err
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OSError(f"output_dir {output_dir} has {free / 2**30:.1f} GiB free, but a checkpoint needs about "
                      f"{needed_bytes / 2**30:.1f} GiB; free some space or choose another output_dir")


def checkpoint_bytes(module: nn.Module) -> int:
    """Rough size of one checkpoint: trainable weights, AdamW's two moments, and the best weights."""
    return 4 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def save(output_dir: Path, module: nn.Module, optimizer, scheduler, state: TrainingState, *,
         weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Writes a checkpoint of ``module``'s trainable weights, the optimizer, scheduler, RNG and ``state``.

    Under FSDP the caller passes ``weights`` and ``optimizer_state`` gathered whole
    (:mod:`~pyterrier_kdcl.training.sharding`): the module itself holds only this process's shard."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    # from a killed run (only one process writes here): unfinished checkpoints, old ones half deleted, and the
    # checkpoints of a finished fit killed while removing them
    for leftover in [*root.glob(f".{PREFIX}*.tmp"), *root.glob(".old-*"), *output_dir.glob(f".old-{root.name}")]:
        shutil.rmtree(leftover, ignore_errors=True)
    target = root / f"{PREFIX}{state.step:08d}"
    if target.exists():  # this step is on disk already (same step, same weights): never delete a good checkpoint
        return target
    try:
        with paths.finalized_directory(target) as tmp:
            save_file(weights if weights is not None else trainable_state(module), tmp / "weights.safetensors")
            if state.best_weights is not None:
                save_file(state.best_weights, tmp / "best.safetensors")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            sharded = optimizer_state is not None  # keyed by parameter name, not by position
            torch.save({"optimizer": optimizer_state if sharded else optimizer.state_dict(), "sharded": sharded,
                        "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "optimizer.pt")
            fields = {k: v for k, v in asdict(state).items() if k != "best_weights"}
            (tmp / "state.json").write_text(json.dumps(fields))
    except OSError as err:
        kept = _complete(root)
        raise OSError(err.errno, f"could not write a checkpoint to {root} ({err}); the last complete checkpoint "
                      f"{kept[-1].name if kept else '(none)'} is kept. Free space, then fit(..., resume=True)") from err
    for old in _complete(root)[:-1]:
        _remove(old)
    return target


def _remove(checkpoint: Path) -> None:
    """Renames first, so a kill during the deletion never leaves a half-deleted ``step-*`` directory."""
    doomed = checkpoint.with_name(f".old-{checkpoint.name}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_all(output_dir: Path) -> None:
    """Removes the checkpoints of a finished fit (call it only once the model is saved). The folder is renamed
    away first, in one ``os.replace``: a kill during the deletion leaves no checkpoint to resume from, only a
    leftover that the next :func:`save` or removal clears."""
    root = output_dir / "checkpoints"
    doomed = output_dir / f".old-{root.name}"
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    if root.exists():
        os.replace(root, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def load_latest(output_dir: Path, module: nn.Module, optimizer, scheduler, sharded: bool = False
                ) -> TrainingState | None:
    """Restores weights, optimizer, scheduler and RNG from the newest checkpoint; None when there is none.
    ``sharded``: ``module`` is sharded by FSDP (every process then loads the whole state and keeps its shard)."""
    complete = _complete(output_dir / "checkpoints")
    if not complete:
        return None
    path = complete[-1]
    weights, saved, fields, best = _read(path)
    expected = {name: p.shape for name, p in module.named_parameters() if p.requires_grad}
    differ = set(weights) ^ set(expected) or {k for k in weights if weights[k].shape != expected[k]}
    if differ:
        raise ValueError(f"checkpoint {path} was written for another model or LoRA setting ({len(differ)} "
                         f"parameters differ in name or shape, e.g. {sorted(differ)[0]}); use a fresh output_dir")
    if saved.get("sharded", False) != sharded:
        written, now = ("FSDP", "DDP or one process") if saved.get("sharded") else ("DDP or one process", "FSDP")
        raise ValueError(f"checkpoint {path} was written under {written} and this fit runs {now}: resume with the "
                         "launch that wrote it, or start afresh in a new output_dir")
    if sharded:
        from pyterrier_kdcl.training.sharding import load_full_state

        load_full_state(module, optimizer, weights, saved["optimizer"])
    else:
        module.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainingState(**fields, best_weights=best)


def _read(path: Path) -> tuple[dict, dict, dict, dict | None]:
    """A checkpoint's weights, optimizer state, training state and best weights (None if it has none), each read
    through :func:`paths.read_written`: a missing or broken file is named, with what to do."""
    remedy = (f"delete {path} to resume from the start (or restore the file); checkpoints are renamed into place "
              "complete, so this one was damaged after it was written")
    readers = {"weights.safetensors": load_file, "optimizer.pt": lambda f: torch.load(f, weights_only=True),
               "state.json": None}
    read = []
    for name, reader in readers.items():
        value = paths.read_written(path / name, reader, remedy=remedy)
        if value is None:
            raise paths.UnreadableFile(f"{path / name} is missing: {remedy}")
        read.append(value)
    return (*read, paths.read_written(path / "best.safetensors", load_file, remedy=remedy))


def _complete(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())
