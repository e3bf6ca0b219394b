"""GPU throughput: kdcl's decoder reranker and LoRA training against plain Hugging Face (+ peft), bf16 on CUDA.

    python benchmarks/gpu.py --out results/   # a Qwen2.5-0.5B-sized decoder on one GPU (a few minutes)
    python benchmarks/gpu.py --tiny           # the same script on a tiny model: a smoke test, CPU allowed (< 1 min)

The model is a randomly initialised decoder of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query and 2 key-value
heads, feed-forward 4864, vocabulary 151,936), written once as a ``Qwen2ForSequenceClassification`` directory with a
one-logit head; both libraries load that directory, in bf16. Nothing comes from the Hub: the tokenizer is a byte-level
BPE built like Qwen2's, trained on the synthetic text (pseudo-words drawn by Zipf's law, about 1.4 tokens a word,
near what Qwen's tokenizer gives on English), so token counts, which set the cost, are realistic; tokens/s are reported.

1. Reranking: ``kdcl.CrossEncoder.transform`` (last-token pooling, pairs batched by length) against a plain loop
   over the same pairs in their given order: ``tokenizer(heads, documents, truncation="only_second")``, EOS
   appended, ``tokenizer.pad``, forward under ``torch.no_grad``. Both feed the model the same token ids
   (``query: {q} document: {d}`` with EOS, checked); the scores must agree within bf16 noise, which is measured:
   twice the largest difference between Hugging Face's bf16 and fp32 scores on the first pairs.
2. LoRA training: ``kdcl.ContrastiveTrainer`` (InfoNCE over groups of one positive and 7 negatives) on a LoRA
   ``CrossEncoder`` against a plain Hugging Face + peft loop doing the same work: same groups (kdcl's
   ``GroupSampler``), same adapter (r 8, alpha 64, dropout 0.1 on every projection, score head trained), AdamW
   (fused) with linear warm-up, clipping at 1.0, bf16 autocast over float32 trainable weights.

Each contender runs once to warm up (kernels, allocator; its token counts are read then), then once a round, in the
rotating order of ``common.rotation``, with ``torch.cuda.synchronize`` around every timing. Ratios are medians of the
per-round ratios, with their range. Training reports steady steps/s (first step of each fit excluded) and
wall-clock steps/s of the whole call, and the peak of ``torch.cuda.max_memory_allocated`` during each call.
A Markdown table is printed; every figure goes to ``gpu.json`` (and the table to ``gpu.md``) in ``--out``
(default: ``$OUT`` if set, else ``./gpu-results``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import paired_ratio, rotation

import pyterrier_kdcl as kdcl

SEED = 0
EOS, PAD = "<|endoftext|>", "<|pad|>"  # a pad token of its own: HF's head reads the last token that is not pad
LORA = {"r": 8, "lora_alpha": 64, "lora_dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TOLERANCE_FLOOR = 1e-3  # a score tolerance never below this (fp32 and bf16 may agree exactly on a tiny model)


@dataclass(frozen=True)
class Sizes:
    """Everything the run's cost depends on; ``TINY`` shrinks each for a smoke test."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151_936
    tokenizer_vocab: int = 16_000
    words: tuple[int, int] = (100, 400)  # document length in words, uniform
    pairs: int = 4096
    pairs_per_query: int = 32
    batch_size: int = 64
    max_length: int = 512
    reference_pairs: int = 512  # scored in fp32 too, to measure bf16 noise
    group_size: int = 8
    groups_per_step: int = 8
    train_max_length: int = 256
    steps: int = 24
    rounds: int = 3


TINY = Sizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096, tokenizer_vocab=2000,
             words=(20, 80), pairs=96, pairs_per_query=8, batch_size=16, max_length=128, reference_pairs=32,
             groups_per_step=2, train_max_length=64, steps=3, rounds=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few pairs: a smoke test, CPU allowed")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results",
                        help="directory for gpu.json and gpu.md (default: $OUT, else ./gpu-results)")
    parser.add_argument("--pairs", type=int, help="pairs to rerank a round")
    parser.add_argument("--steps", type=int, help="optimizer steps a training fit")
    parser.add_argument("--rounds", type=int, help="timed rounds after the warm-up")
    parser.add_argument("--only", choices=["rerank", "train"], help="run one part")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("benchmarks/gpu.py measures CUDA throughput, but torch sees no CUDA device "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a GPU machine, "
                 "or add --tiny for a small smoke test on the CPU.")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and saving bars, four times over
    sizes = TINY if args.tiny else Sizes()
    sizes = replace(sizes, **{k: getattr(args, k) for k in ("pairs", "steps", "rounds") if getattr(args, k)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine": machine(device), "sizes": asdict(sizes), "lora": LORA}
    print(f"# gpu.py {time.strftime('%Y-%m-%d %H:%M')}  {results['machine']}", flush=True)

    text = SyntheticText(SEED)
    parts = {"rerank": benchmark_rerank, "train": benchmark_training}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_model(Path(tmp) / "model", sizes, text, device)
        print(f"model written in {time.perf_counter() - start:.0f}s", flush=True)
        for part in [args.only] if args.only else parts:
            try:
                results[part] = parts[part](path, sizes, text, device)
            except Exception as err:  # a GPU run is one shot: the other part's figures still count
                traceback.print_exc()
                results[part] = {"error": f"{type(err).__name__}: {err}"}
            empty_cache(device)  # the part's models went with its frame
            save(results, Path(args.out))
    print("\n" + markdown(results))
    print(f"wrote gpu.json and gpu.md to {args.out}")
    failed = [part for part in parts if "error" in results.get(part, {})]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see the traceback above)")


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    (out / "gpu.md").write_text(markdown(results) + "\n")


def machine(device: torch.device) -> dict:
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}


# -- data and model ------------------------------------------------------------------------------------------
class SyntheticText:
    """Text without data: pseudo-words of 1-4 syllables, drawn by Zipf's law (s = 1.05 over 30,000 words), with
    full stops and commas. A BPE tokenizer trained on it cuts it much as Qwen's cuts English: frequent words whole,
    rare ones in pieces, about 1.4 tokens a word."""

    def __init__(self, seed: int, words: int = 30_000):
        self.rng = np.random.default_rng(seed)
        onsets = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl"]
        syllables = [o + v + c for o in onsets for v in [*"aeiou", "ai", "ou", "ea"] for c in ["", "", "n", "r", "s"]]
        lexicon: dict[str, None] = {}
        while len(lexicon) < words:
            parts = self.rng.integers(len(syllables), size=4)
            lexicon["".join(syllables[p] for p in parts[: self.rng.integers(1, 5)])] = None
        self.lexicon = np.array(list(lexicon))
        ranks = np.arange(1, words + 1)
        self.p = ranks**-1.05 / (ranks**-1.05).sum()

    def texts(self, n: int, low: int, high: int) -> list[str]:
        """``n`` texts of ``low`` to ``high`` words (uniform)."""
        lengths = self.rng.integers(low, high + 1, size=n)
        words = self.lexicon[self.rng.choice(len(self.lexicon), size=lengths.sum(), p=self.p)].astype(object)
        marks = self.rng.random(len(words))
        words[marks < 0.08] += "."
        words[(marks >= 0.08) & (marks < 0.13)] += ","
        ends = np.cumsum(lengths)
        return [" ".join(words[end - length : end]) for end, length in zip(ends, lengths)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with Qwen2's normalizer, pre-tokenizer and decoder (so transformers' Qwen2 class,
    which rebuilds that pipeline when it loads the directory, changes nothing), trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, padding_side="right")


def write_model(path: Path, sizes: Sizes, text: SyntheticText, device: torch.device) -> Path:
    """A random Qwen2 decoder with a one-logit classification head and the tokenizer, saved in bf16."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = train_tokenizer(text.texts(2000, *sizes.words), sizes.tokenizer_vocab)
    config = Qwen2Config(vocab_size=sizes.vocab, hidden_size=sizes.hidden, num_hidden_layers=sizes.layers,
                         num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
                         intermediate_size=sizes.intermediate, max_position_embeddings=32_768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    with torch.device(device):  # initialised where it runs: seconds instead of a minute of CPU for 0.5B weights
        model = Qwen2ForSequenceClassification(config)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    empty_cache(device)
    return path


def hf_batch(tokenizer, queries: list[str], texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """The plain Hugging Face way to the inputs kdcl builds: the template's head and the document as a pair, the
    document cut to fit, EOS appended (after the cut, so that every pair ends with it), padded on the right."""
    heads = [f"query: {q} document: " for q in queries]
    encoded = tokenizer(heads, texts, truncation="only_second", max_length=max_length - 1)
    ids = [row + [tokenizer.eos_token_id] for row in encoded["input_ids"]]
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")


def hf_ids(tokenizer, queries: list[str], texts: list[str], max_length: int) -> list[list[int]]:
    batch = hf_batch(tokenizer, queries, texts, max_length)
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


# -- timing --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    gc.collect()  # peft and hooks hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Run:
    seconds: float
    result: object
    peak_gib: float | None  # torch.cuda.max_memory_allocated during the call
    resident_gib: float | None  # allocated when the call began (the models' weights)


def timed(fn, device: torch.device) -> Run:
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return Run(seconds, result, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, resident)


def warm_up(contenders: dict, device: torch.device) -> dict[str, Run]:
    """Each contender once, left out of the figures: kernels, allocator and caches settle."""
    runs = {}
    for name, fn in contenders.items():
        runs[name] = timed(fn, device)
        print(f"  warm-up: {name:<5} {runs[name].seconds:7.2f}s", flush=True)
    return runs


def in_rotation(contenders: dict, rounds: int, device: torch.device) -> dict[str, list[Run]]:
    """Each contender once a round, in rotating order (A B, B A, ...): drift cancels out of the per-round ratios."""
    runs = {name: [] for name in contenders}
    for r in range(rounds):
        for name in rotation(list(contenders), r):
            runs[name].append(timed(contenders[name], device))
            print(f"  round {r}: {name:<5} {runs[name][-1].seconds:7.2f}s", flush=True)
    return runs


class TokenCounter:
    """Counts the tokens a module is fed (``input_ids`` with padding, ``attention_mask`` without) while active."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.padded, self.real, self.calls = module, 0, 0, 0

    def __enter__(self):
        def count(_module, args, kwargs):
            self.padded += kwargs["input_ids"].numel()
            self.real += int(kwargs["attention_mask"].sum())
            self.calls += 1

        self.handle = self.module.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def ratio(kdcl_seconds: list[float], hf_seconds: list[float]) -> dict:
    """kdcl's speed over Hugging Face's: median of the per-round ratios, with their range."""
    median, low, high = paired_ratio(hf_seconds, kdcl_seconds)
    return {"median": median, "min": low, "max": high}


# -- 1. reranking --------------------------------------------------------------------------------------------
def benchmark_rerank(path: Path, sizes: Sizes, text: SyntheticText, device: torch.device) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    print(f"\n## reranking: {sizes.pairs} pairs, batch {sizes.batch_size}, max_length {sizes.max_length}", flush=True)
    n_queries = -(-sizes.pairs // sizes.pairs_per_query)
    query_texts = text.texts(n_queries, 2, 6)
    frame = pd.DataFrame({"qid": [f"q{i // sizes.pairs_per_query}" for i in range(sizes.pairs)],
                          "query": [query_texts[i // sizes.pairs_per_query] for i in range(sizes.pairs)],
                          "docno": [f"d{i}" for i in range(sizes.pairs)],
                          "text": text.texts(sizes.pairs, *sizes.words)})

    reranker = kdcl.CrossEncoder(str(path), batch_size=sizes.batch_size, max_length=sizes.max_length,
                                 dtype="bfloat16", device=device, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    queries, texts = frame["query"].tolist(), frame["text"].tolist()
    kdcl_ids = [pair.input_ids for pair in reranker.encoder.encode(queries, texts)]
    same_ids = kdcl_ids == hf_ids(tokenizer, queries, texts, sizes.max_length)

    def kdcl_scores() -> np.ndarray:
        return reranker.transform(frame).set_index("docno")["score"].loc[frame["docno"]].to_numpy()

    contenders = {"kdcl": kdcl_scores, "HF": lambda: hf_scores(model, tokenizer, queries, texts, sizes, device)}
    with TokenCounter(reranker.ranker) as kdcl_tokens, TokenCounter(model) as hf_tokens:
        warmup = warm_up(contenders, device)
    runs = in_rotation(contenders, sizes.rounds, device)
    reference = sizes.reference_pairs
    reference_model = copy.deepcopy(model).float()
    fp32 = hf_scores(reference_model, tokenizer, queries[:reference], texts[:reference], sizes, device)
    del reference_model
    empty_cache(device)

    kdcl_out, hf_out = warmup["kdcl"].result, warmup["HF"].result
    noise = float(np.abs(hf_out[:reference] - fp32).max())
    tolerance = max(2 * noise, TOLERANCE_FLOOR)
    max_diff = float(np.abs(kdcl_out - hf_out).max())
    counts = {"kdcl": kdcl_tokens, "HF": hf_tokens}
    figures = {}
    for name in contenders:
        seconds = [run.seconds for run in runs[name]]
        median = statistics.median(seconds)
        figures[name] = {"seconds": seconds, "pairs_per_s": sizes.pairs / median,
                         "tokens_per_s": counts[name].real / median, "tokens": counts[name].real,
                         "tokens_with_padding": counts[name].padded, "forward_calls": counts[name].calls,
                         "peak_gib": max_or_none(run.peak_gib for run in runs[name]),
                         "resident_gib": runs[name][0].resident_gib}
    return {**figures, "ratio": ratio(figures["kdcl"]["seconds"], figures["HF"]["seconds"]),
            "same_input_ids": same_ids,
            "scores": {"max_abs_diff": max_diff, "mean_abs_diff": float(np.abs(kdcl_out - hf_out).mean()),
                       "std": float(hf_out.std()), "bf16_noise": noise, "tolerance": tolerance,
                       "reference_pairs": reference,
                       "kdcl_vs_fp32": float(np.abs(kdcl_out[:reference] - fp32).max()),
                       "agree": max_diff <= tolerance}}


def hf_scores(model, tokenizer, queries, texts, sizes: Sizes, device: torch.device) -> np.ndarray:
    """Plain Hugging Face reranking: batches in the given order, padded to their longest pair."""
    out = []
    with torch.no_grad():
        for start in range(0, len(queries), sizes.batch_size):
            end = start + sizes.batch_size
            batch = hf_batch(tokenizer, queries[start:end], texts[start:end], sizes.max_length).to(device)
            out.append(model(**batch).logits[:, 0].float().cpu())
    return torch.cat(out).numpy()


# -- 2. LoRA training ----------------------------------------------------------------------------------------
def benchmark_training(path: Path, sizes: Sizes, text: SyntheticText, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    group, n_queries = sizes.group_size, sizes.steps * sizes.groups_per_step
    print(f"\n## LoRA training: {sizes.steps} steps a fit, {sizes.groups_per_step} groups of {group} a step, "
          f"max_length {sizes.train_max_length}", flush=True)
    queries = text.texts(n_queries, 2, 6)
    frame = pd.DataFrame({"qid": [f"q{i // group}" for i in range(n_queries * group)],
                          "query": [queries[i // group] for i in range(n_queries * group)],
                          "docno": [f"d{i}" for i in range(n_queries * group)],
                          "text": text.texts(n_queries * group, *sizes.words)})
    qrels = pd.DataFrame({"qid": [f"q{i}" for i in range(n_queries)],
                          "docno": [f"d{i * group}" for i in range(n_queries)], "label": 1})
    groups = list(kdcl.GroupSampler(frame, qrels, group_size=group, seed=SEED).epoch(0))  # the trainer's groups

    reranker = kdcl.CrossEncoder(str(path), max_length=sizes.train_max_length, dtype="bfloat16", device=device,
                                 lora=LORA, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).to(device)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **LORA))  # SEQ_CLS: the score head trains too
    for param in model.parameters():
        if param.requires_grad:  # float32 weights to step, bf16 autocast to compute: what kdcl's trainer does
            param.data = param.data.float()

    contenders = {"kdcl": lambda: fit_kdcl(reranker, frame, qrels, sizes),
                  "HF": lambda: fit_hf(model, tokenizer, groups, sizes, device)}
    with TokenCounter(reranker.ranker) as kdcl_tokens, TokenCounter(model) as hf_tokens:
        warmup = warm_up(contenders, device)
    runs = in_rotation(contenders, sizes.rounds, device)

    counts = {"kdcl": kdcl_tokens, "HF": hf_tokens}
    trainable = {"kdcl": reranker.ranker, "HF": model}
    figures = {}
    for name in contenders:
        step_seconds = [steady_step_seconds(run.result["seconds"]) for run in runs[name]]
        tokens_per_step = counts[name].real / counts[name].calls
        steps_per_s = 1 / statistics.median(step_seconds)
        figures[name] = {
            "steady_step_seconds": step_seconds, "fit_seconds": [run.seconds for run in runs[name]],
            "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * tokens_per_step,
            "wall_steps_per_s": sizes.steps / statistics.median(run.seconds for run in runs[name]),
            "tokens_per_step": tokens_per_step,
            "tokens_per_step_with_padding": counts[name].padded / counts[name].calls,
            "peak_gib": max_or_none(run.peak_gib for run in runs[name]), "resident_gib": runs[name][0].resident_gib,
            "first_step_loss": warmup[name].result["losses"][0],
            "trainable_parameters": sum(p.numel() for p in trainable[name].parameters() if p.requires_grad)}
    return {**figures, "ratio": ratio(figures["kdcl"]["steady_step_seconds"], figures["HF"]["steady_step_seconds"]),
            "wall_ratio": ratio(figures["kdcl"]["fit_seconds"], figures["HF"]["fit_seconds"])}


def fit_kdcl(reranker, frame: pd.DataFrame, qrels: pd.DataFrame, sizes: Sizes) -> dict:
    trainer = kdcl.ContrastiveTrainer(reranker, group_size=sizes.group_size, batch_size=sizes.groups_per_step,
                                      epochs=1, learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.01,
                                      max_grad_norm=1.0, seed=SEED, verbose=False)
    log = trainer.fit(frame, qrels)
    return {"seconds": log["seconds"].tolist(), "losses": log["loss"].tolist()}


def fit_hf(model, tokenizer, groups: list, sizes: Sizes, device: torch.device) -> dict:
    """The plain loop: InfoNCE over each group (the positive first) is cross-entropy with target 0."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * sizes.steps), sizes.steps)
    model.train()
    seconds, losses, start = [], [], time.perf_counter()
    for first in range(0, len(groups), sizes.groups_per_step):
        batch = groups[first : first + sizes.groups_per_step]
        inputs = hf_batch(tokenizer, [g.query for g in batch for _ in g.texts], [t for g in batch for t in g.texts],
                          sizes.train_max_length).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            scores = model(**inputs).logits.float().view(len(batch), sizes.group_size)
        loss = F.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long, device=device))
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "losses": losses}


def steady_step_seconds(ends: list[float]) -> float:
    """Mean seconds of a step after the first (whose end is the first sync point after setup)."""
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


# -- report --------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    m, s = results["machine"], results["sizes"]
    lines = [f"{m['device']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"Python {m['python']}; bf16; medians of {s['rounds']} rounds after a warm-up", "",
             "| figure | kdcl | Hugging Face | kdcl / HF |", "| --- | ---: | ---: | ---: |"]
    for part in ("rerank", "train"):
        if "error" in results.get(part, {}):
            lines.append(f"| {part} failed: {results[part]['error'][:200]} | | | |")
    if "kdcl" in results.get("rerank", {}):
        r = results["rerank"]
        k, h = r["kdcl"], r["HF"]
        what = f"{s['pairs']:,} pairs, batch {s['batch_size']}, max_length {s['max_length']}"
        lines += [row(f"reranking pairs/s ({what})", k["pairs_per_s"], h["pairs_per_s"], r["ratio"]),
                  row("reranking tokens/s (non-padding)", k["tokens_per_s"], h["tokens_per_s"]),
                  row("— tokens through the model, padding included", k["tokens_with_padding"],
                      h["tokens_with_padding"]),
                  row("— peak CUDA memory, GiB", k["peak_gib"], h["peak_gib"])]
    if "kdcl" in results.get("train", {}):
        t = results["train"]
        k, h = t["kdcl"], t["HF"]
        what = (f"{s['groups_per_step']} groups of {s['group_size']}, max_length {s['train_max_length']}, "
                f"{s['steps']} steps a fit")
        lines += [row(f"LoRA training steps/s, steady ({what})", k["steps_per_s"], h["steps_per_s"], t["ratio"]),
                  row("LoRA training tokens/s, steady (non-padding)", k["tokens_per_s"], h["tokens_per_s"]),
                  row("LoRA training steps/s, wall-clock of the whole fit", k["wall_steps_per_s"],
                      h["wall_steps_per_s"], t["wall_ratio"]),
                  row("— peak CUDA memory, GiB", k["peak_gib"], h["peak_gib"]),
                  row("— weights resident when a fit starts (both models), GiB", k["resident_gib"],
                      h["resident_gib"])]
    lines.append("")
    if "kdcl" in results.get("rerank", {}):
        sc, r = results["rerank"]["scores"], results["rerank"]
        lines.append(f"Scores: max |kdcl - HF| {sc['max_abs_diff']:.2e} over {s['pairs']:,} pairs (mean "
                     f"{sc['mean_abs_diff']:.1e}; the scores' std {sc['std']:.3f}); bf16 noise, HF bf16 vs fp32 on "
                     f"the first {sc['reference_pairs']} pairs, {sc['bf16_noise']:.2e} (kdcl vs fp32 "
                     f"{sc['kdcl_vs_fp32']:.2e}); tolerance {sc['tolerance']:.2e}: "
                     f"{'agree' if sc['agree'] else 'DO NOT AGREE'}. Same input ids: "
                     f"{'yes' if r['same_input_ids'] else 'NO'}.")
    if "kdcl" in results.get("train", {}):
        t = results["train"]
        lines.append(f"Training: first-step loss kdcl {t['kdcl']['first_step_loss']:.4f}, HF "
                     f"{t['HF']['first_step_loss']:.4f} (same weights, adapter B = 0, same first batch); trainable "
                     f"parameters kdcl {t['kdcl']['trainable_parameters']:,}, HF {t['HF']['trainable_parameters']:,}.")
    return "\n".join(lines)


def row(label: str, kdcl_value, hf_value, paired: dict | None = None) -> str:
    """A table row; the ratio is the per-round median with its range where rounds were paired, else the quotient."""
    if paired is not None:
        ratio_text = f"**{paired['median']:.2f}x** ({paired['min']:.2f}-{paired['max']:.2f})"
    elif kdcl_value is not None and hf_value:
        ratio_text = f"{kdcl_value / hf_value:.2f}x"
    else:
        ratio_text = ""
    return f"| {label} | {number(kdcl_value)} | {number(hf_value)} | {ratio_text} |"


def number(value) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


if __name__ == "__main__":
    main()
