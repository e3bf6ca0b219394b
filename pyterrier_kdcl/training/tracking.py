"""Experiment tracking through Hugging Face Accelerate's trackers: TensorBoard, Weights & Biases, MLflow.

A trainer's ``report_to`` names the trackers; each fit is one run of each, logging per optimizer step the loss,
the learning rate, the loss's temperatures and the pairs scored per second, and at each validation the metric and
the seconds it took. TensorBoard's event files go under ``output_dir/runs/kdcl``; W&B keeps its files under
``output_dir/runs`` (offline with ``WANDB_MODE=offline``); MLflow logs where its tracking URI points
(``MLFLOW_TRACKING_URI``). Tracking never changes what a fit computes, so it is part of no fingerprint.

Example::

    kdcl.ContrastiveTrainer(student, output_dir="runs/cl", report_to="tensorboard").fit(res, qrels, va, va_qrels)
    # tensorboard --logdir runs/cl/runs
"""

from __future__ import annotations

import re
from pathlib import Path

#: what each tracker name needs installed: (module Accelerate imports, what to pip install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
PROJECT = "kdcl"  # TensorBoard's folder under output_dir/runs, W&B's project, MLflow's experiment


def trackers(report_to) -> list[str]:
    """The tracker names of a ``report_to`` value (``None``, ``"none"``, a name or a list of names), checked: an
    unknown name, or a tracker whose package is not installed, is a ``ValueError`` saying what to do.

    >>> trackers(None), trackers("none")
    ([], [])
    """
    names = [] if report_to is None else [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to={report_to!r}: unknown tracker {unknown[0]!r}; use "
                         f"{', '.join(map(repr, TRACKERS))}, a list of them, or None")
    for name in names:
        if (problem := missing_package(name)) is not None:
            raise ValueError(f"report_to={report_to!r}: {problem}")
    return list(dict.fromkeys(names))


def missing_package(name: str) -> str | None:
    """What to install for tracker ``name`` when its package is missing; None when it is there (or unknown)."""
    import importlib.util

    module, package = TRACKERS.get(name, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    extra = ' (or pip install "pyterrier-kdcl[tracking]")' if name == "tensorboard" else ""
    return f"tracking with {name} needs the {package} package, which is not installed: pip install {package}{extra}"


def start(accelerator, names: list[str], output_dir: Path | None, config: dict) -> None:
    """Starts one run of each tracker for this fit (on the main process; Accelerate skips the others)."""
    if not names:
        return
    name = str(output_dir) if output_dir is not None else None
    runs = str(output_dir / "runs") if output_dir is not None else None
    init = {"wandb": {k: v for k, v in (("name", name), ("dir", runs)) if v is not None},
            "mlflow": {"run_name": name} if name else {}}
    config = {k: v for k, v in config.items() if v is not None}  # TensorBoard's hparams refuse None
    accelerator.init_trackers(PROJECT, config=config, init_kwargs={n: init[n] for n in names if n in init})


def finish(accelerator) -> None:
    """Closes this fit's runs (event files flushed). Not ``accelerator.end_training()``: that also ends the
    process group, which a DDP experiment still needs for its next stage."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def metric_name(metric: str) -> str:
    """The validation metric's tracker name: MLflow refuses ``@`` in names, so ``nDCG@10`` is ``validation/nDCG_10``
    in every tracker alike."""
    return "validation/" + re.sub(r"[^\w./ -]", "_", metric)
