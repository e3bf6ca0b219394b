"""FSDP on GPUs: a fit under FSDP (version 2, through Accelerate) against the same fit in one plain process.

    python benchmarks/gpu_fsdp.py --out results/    # a Qwen2.5-0.5B-sized decoder on every visible GPU (minutes)
    python benchmarks/gpu_fsdp.py --tiny            # a tiny decoder on two CPU processes (gloo): a smoke test

tests/test_fsdp.py runs FSDP on two CPU processes with a tiny decoder; this script is its counterpart for a GPU
machine (NCCL, bf16 autocast, a decoder of real size), for the questions only such a machine answers:

1. Does a sharded fit on CUDA save one full model (every tensor at its full shape, no shard) that
   ``kdcl.CrossEncoder.load`` reads back with the scores the trainer itself gives after the fit?
2. Does it train what the plain fit trains? Both fits start from the same weights and see the same groups (kdcl's
   ``GroupSampler``, seeded; no dropout); their probe scores are compared. bf16 arithmetic and a sharded reduction
   order make them differ a little, so the gap between them (the largest difference of mean-centred scores) is
   set against two yardsticks: how far training moved the scores, and the gap between two plain fits in bf16 and
   in float32 arithmetic (what precision alone moves). It passes when the FSDP gap is under 5% of the training
   move or under twice the precision gap.
3. What does FSDP cost or save: steady steps/s and peak CUDA memory per process, for full fine-tuning and LoRA.

The model is benchmarks/gpu.py's randomly initialised Qwen2.5-0.5B-shaped decoder (its synthetic text and
tokenizer too): nothing comes from the Hub. Each fit runs in a process of its own (``torch.distributed.run`` with
``ACCELERATE_USE_FSDP=true FSDP_VERSION=2`` for FSDP, one GPU a process), writes its figures and probe scores to
``--out``, and the summary goes to ``gpu_fsdp.json`` and ``gpu_fsdp.md`` there (default: ``$OUT`` if set, else
``./gpu-fsdp-results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from gpu import LORA, SEED, TINY, Sizes, SyntheticText, machine, write_model

import pyterrier_kdcl as kdcl

LORA = {**LORA, "lora_dropout": 0.0}  # dropout would draw other masks in one process than in several
VARIANTS = ("full", "lora")
PROBE_PAIRS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on two CPU processes: a smoke test")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-fsdp-results")
    parser.add_argument("--steps", type=int, help="optimizer steps a fit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = TINY if args.tiny else Sizes()
    sizes = replace(sizes, steps=args.steps or sizes.steps)
    if args.worker:
        return worker(*args.worker, sizes=sizes, tiny=args.tiny)
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("benchmarks/gpu_fsdp.py measures FSDP on CUDA, but torch sees no CUDA device; run it on a GPU "
                 "machine, or add --tiny for a smoke test on two CPU processes.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processes = torch.cuda.device_count() if device.type == "cuda" else 2
    results = {"machine": machine(device), "processes": processes, "sizes": asdict(sizes), "lora": LORA}
    print(f"# gpu_fsdp.py {time.strftime('%Y-%m-%d %H:%M')}  {results['machine']}, FSDP over {processes} "
          f"process(es)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "model", sizes, SyntheticText(SEED), device)
        for variant in args.variants:
            runs = {}
            for launch in ("plain", "plain-fp32", "fsdp"):
                where = Path(tmp) / variant / launch
                start = time.perf_counter()
                code = launch_worker(launch, variant, model, where, processes, args.tiny)
                runs[launch] = {"exit": code, "seconds": time.perf_counter() - start}
                if code == 0:
                    runs[launch].update(json.loads((where / "figures.json").read_text()))
                print(f"{variant} {launch}: exit {code} in {runs[launch]['seconds']:.0f}s", flush=True)
            results[variant] = {"runs": runs, "checks": checks(runs, Path(tmp) / variant, device, sizes)}
            (out / "gpu_fsdp.json").write_text(json.dumps(results, indent=2, default=float))
    table = markdown(results)
    (out / "gpu_fsdp.md").write_text(table + "\n")
    print("\n" + table)
    failed = [v for v in args.variants if not results[v]["checks"].get("passed")]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see above)")


def launch_worker(launch: str, variant: str, model: Path, where: Path, processes: int, tiny: bool) -> int:
    where.mkdir(parents=True)
    script = [str(Path(__file__).resolve()), "--worker", variant, str(model), str(where)] + (["--tiny"] * tiny)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "KDCL_PRECISION": "fp32" if launch == "plain-fp32" else "bf16"}
    if launch == "fsdp":
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_port=29531", *script]
    else:
        command = [sys.executable, *script]
    with open(where / "log.txt", "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=where).returncode
    if code:
        print((where / "log.txt").read_text()[-4000:], flush=True)
    return code


def training_data(sizes: Sizes) -> tuple[pd.DataFrame, pd.DataFrame, tuple[list[str], list[str]]]:
    """The same synthetic groups in every process (one positive and ``group_size - 1`` negatives a query), and the
    probe pairs the fits are compared on."""
    text, group = SyntheticText(SEED + 1), sizes.group_size
    n_queries = sizes.steps * sizes.groups_per_step
    queries = text.texts(n_queries, 2, 6)
    n = n_queries * group
    frame = pd.DataFrame({"qid": [f"q{i // group}" for i in range(n)], "query": [queries[i // group] for i in range(n)],
                          "docno": [f"d{i}" for i in range(n)], "text": text.texts(n, *sizes.words)})
    qrels = pd.DataFrame({"qid": [f"q{i}" for i in range(n_queries)],
                          "docno": [f"d{i * group}" for i in range(n_queries)], "label": 1})
    probes = min(PROBE_PAIRS, n)
    return frame, qrels, (frame["query"].tolist()[:probes], frame["text"].tolist()[:probes])


def worker(variant: str, model: str, where: str, sizes: Sizes, tiny: bool) -> None:
    """One fit (this process's share of it under FSDP); the first process writes its figures and probe scores."""
    frame, qrels, probe = training_data(sizes)
    rank = int(os.environ.get("RANK", 0))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    reranker = kdcl.CrossEncoder(model, max_length=sizes.train_max_length, dtype="float32", device=device,
                                 lora=LORA if variant == "lora" else None, verbose=False)
    trainer = kdcl.ContrastiveTrainer(reranker, group_size=sizes.group_size, batch_size=sizes.groups_per_step,
                                      epochs=1, learning_rate=1e-5 if variant == "full" else 1e-4, warmup_ratio=0.1,
                                      max_grad_norm=1.0, seed=SEED, precision=os.environ["KDCL_PRECISION"],
                                      output_dir=Path(where) / "fit", verbose=False)
    fresh = reranker.score_pairs(*probe, progress=False)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    log = trainer.fit(frame, qrels)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    scores = trainer.reranker.score_pairs(*probe, progress=False)
    if rank == 0:
        seconds = log["seconds"].tolist()
        figures = {"steps_per_s": (len(seconds) - 1) / (seconds[-1] - seconds[0]), "peak_gib": peak,
                   "losses": log["loss"].tolist(), "scores": np.asarray(scores, dtype=float).tolist(),
                   "fresh_scores": np.asarray(fresh, dtype=float).tolist()}
        (Path(where) / "figures.json").write_text(json.dumps(figures))


def checks(runs: dict, where: Path, device: torch.device, sizes: Sizes) -> dict:
    """What the saved models hold and how the fits' scores agree."""
    from safetensors import safe_open

    if any(run["exit"] for run in runs.values()):
        return {"passed": False, "why": "a fit failed"}
    _, _, probe = training_data(sizes)
    shapes = {}
    for launch in ("plain", "fsdp"):
        saved = where / launch / "fit" / "model"
        shapes[launch] = {}
        for file in sorted(saved.rglob("*.safetensors")):  # the model, or the head and the LoRA adapter
            with safe_open(str(file), "pt") as tensors:
                name = file.relative_to(saved)
                shapes[launch].update({f"{name}:{k}": tuple(tensors.get_slice(k).get_shape()) for k in tensors.keys()})
    loaded = kdcl.CrossEncoder.load(str(where / "fsdp" / "fit" / "model"), device=device, dtype="float32",
                                    verbose=False)
    reloaded = np.asarray(loaded.score_pairs(*probe, progress=False), dtype=float)
    scores = {launch: np.asarray(run["scores"]) for launch, run in runs.items()}
    fresh = np.asarray(runs["plain"]["fresh_scores"])
    result = {
        "same_tensors_and_shapes_as_plain": shapes["plain"] == shapes["fsdp"],
        "tensors_saved": len(shapes["fsdp"]),
        "reload_max_abs_difference": float(np.abs(reloaded - scores["fsdp"]).max()),
        "training_move": gap(scores["plain"], fresh),
        "fsdp_vs_plain": gap(scores["fsdp"], scores["plain"]),
        "bf16_vs_fp32_plain": gap(scores["plain"], scores["plain-fp32"]),
        "pearson_fsdp_plain": float(np.corrcoef(scores["fsdp"], scores["plain"])[0, 1]),
    }
    # one full model, read back as the trainer left it, trained like the plain fit
    result["passed"] = bool(result["same_tensors_and_shapes_as_plain"] and result["tensors_saved"]
                            and result["reload_max_abs_difference"] <= 1e-3 * max(1.0, float(scores["fsdp"].std()))
                            and result["training_move"] > 0
                            and (result["fsdp_vs_plain"] < 0.05 * result["training_move"]
                                 or result["fsdp_vs_plain"] < 2 * result["bf16_vs_fp32_plain"]))
    return result


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference of two score vectors once each is centred (InfoNCE is blind to a common shift)."""
    return float(np.abs((a - a.mean()) - (b - b.mean())).max())


def markdown(results: dict) -> str:
    lines = [f"{results['machine']['device']}; torch {results['machine']['torch']}, transformers "
             f"{results['machine']['transformers']}, peft {results['machine']['peft']}; FSDP over "
             f"{results['processes']} process(es); {results['sizes']['steps']} steps of "
             f"{results['sizes']['groups_per_step']} groups of {results['sizes']['group_size']}, max_length "
             f"{results['sizes']['train_max_length']}", "",
             "| fit | plain bf16 steps/s | FSDP bf16 steps/s | plain peak GiB | FSDP peak GiB (process 0) | "
             "training move | FSDP − plain gap (r) | bf16 − fp32 gap | reload max diff | full model saved | passed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for variant in VARIANTS:
        if variant not in results:
            continue
        runs, check = results[variant]["runs"], results[variant]["checks"]
        if "fsdp_vs_plain" not in check:
            lines.append(f"| {variant} | {check.get('why')} |")
            continue
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {variant} | {fmt(runs['plain']['steps_per_s'])} | {fmt(runs['fsdp']['steps_per_s'])} | "
                     f"{fmt(runs['plain']['peak_gib'])} | {fmt(runs['fsdp']['peak_gib'])} | "
                     f"{check['training_move']:.3f} | {check['fsdp_vs_plain']:.4f} "
                     f"({check['pearson_fsdp_plain']:.4f}) | "
                     f"{check['bf16_vs_fp32_plain']:.4f} | {check['reload_max_abs_difference']:.1e} | "
                     f"{'yes' if check['same_tensors_and_shapes_as_plain'] else 'NO'} ({check['tensors_saved']} "
                     f"tensors) | {'yes' if check['passed'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
