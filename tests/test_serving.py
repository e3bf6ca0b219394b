"""The int8 CPU path against float32, and sharded scoring against single-process scoring (float32, bf16, int8)."""

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

import pyterrier_kdcl as kdcl
from pyterrier_kdcl import models
from pyterrier_kdcl.serving import (
    FFN_OUTPUT,
    ShardedScorer,
    is_optimized,
    optimize_for_cpu,
    score_sharded,
    shard_by_query,
)

TEXTS = ["read from a file descriptor", "list directory contents and more", "copy files and directories",
         "print a line of text to the standard output, then a newline", "change file mode bits",
         "open and possibly create a file", "the quick brown fox jumps over the lazy dog"]
QUERIES = ["read file", "how do I list a directory", "copy", "print text", "file permissions"]


def frame(n_queries=5, docs_per_query=6):
    rows = [{"qid": f"q{q}", "query": QUERIES[q % len(QUERIES)], "docno": f"d{q}-{d}",
             "text": " ".join(TEXTS[(q + d + i) % len(TEXTS)] for i in range(1 + d % 3))}
            for q in range(n_queries) for d in range(docs_per_query)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # qids interleaved


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT reranker whose scores spread (a default-initialised tiny model scores every pair alike)."""
    from tiny_models import tiny_config, wordpiece_tokenizer
    from transformers import BertForSequenceClassification

    source = tmp_path_factory.mktemp("tiny-bert-wide")
    tokenizer = wordpiece_tokenizer()
    config = tiny_config("bert", len(tokenizer))
    config.update({"num_labels": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "initializer_range": 0.1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    path = tmp_path_factory.mktemp("serving") / "reranker"
    kdcl.CrossEncoder(source, verbose=False, device="cpu", batch_size=4).save(path)
    return path


@pytest.fixture(scope="module")
def sharded(saved):
    scorer = ShardedScorer(saved, workers=2, threads=1)
    yield scorer
    scorer.close()


# -- int8 ------------------------------------------------------------------------------------------------------
def test_int8_scores_are_close_to_float32_and_rank_alike(saved):
    inp = frame()
    fp32 = kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)
    int8 = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int8", keep_float=None)
    assert is_optimized(int8) and not is_optimized(fp32)
    quantized = [m for m in int8.ranker.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    layers = [m for m in quantized if hasattr(m, "weight")]
    assert layers and all(m.weight().qscheme() == torch.per_channel_affine for m in layers)
    a, b = fp32.score_pairs(inp["query"], inp["text"]), int8.score_pairs(inp["query"], inp["text"])
    spread = a.max() - a.min()
    assert spread > 0.1
    assert np.abs(a - b).max() < 0.15 * spread
    assert spearmanr(a, b).statistic > 0.9
    out = int8(inp)
    assert len(out) == len(inp) and out.groupby("qid")["score"].apply(lambda s: s.is_monotonic_decreasing).all()


def test_int8_keeps_one_logit_heads_in_float32(saved):
    int8 = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int8")
    classifier = int8.ranker.model.classifier
    assert type(classifier) is torch.nn.Linear and classifier.weight.dtype == torch.float32


def test_feed_forward_outputs_stay_float32_by_default(saved):
    layers = dict(optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int8")
                  .ranker.named_modules())
    kept = [n for n in layers if re.search(FFN_OUTPUT, n)]
    assert kept == [f"model.bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert all(type(layers[n]) is torch.nn.Linear for n in kept)
    assert type(layers["model.bert.encoder.layer.0.attention.output.dense"]) is not torch.nn.Linear
    assert type(layers["model.bert.encoder.layer.0.intermediate.dense"]) is not torch.nn.Linear


def test_int8_is_idempotent_and_answers_empty_frames(saved):
    reranker = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int8")
    assert optimize_for_cpu(reranker, "int8") is reranker
    assert len(reranker(frame().iloc[:0])) == 0


def test_int8_merges_a_lora_adapter_first(tiny_model):
    reranker = kdcl.CrossEncoder(tiny_model("bert"), lora={"r": 4}, device="cpu", verbose=False)
    inp = frame(2, 3)
    before = reranker.score_pairs(inp["query"], inp["text"])
    optimize_for_cpu(reranker, "int8")
    assert not models.has_lora(reranker.ranker)
    after = reranker.score_pairs(inp["query"], inp["text"])
    assert np.abs(after - before).max() < 0.1 * (before.max() - before.min()) + 1e-3


def test_int8_reranker_refuses_to_save_fingerprint_or_train(saved, tmp_path):
    reranker = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False))
    with pytest.raises(ValueError, match="cannot save.*float checkpoint"):
        reranker.save(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match="cannot fingerprint"):
        reranker.fingerprint()
    with pytest.raises(ValueError, match="cannot train"):
        kdcl.ContrastiveTrainer(reranker)


def test_unknown_method_is_refused(saved):
    with pytest.raises(ValueError, match="int8"):
        optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int4")


# -- sharding ---------------------------------------------------------------------------------------------------
def test_shards_hold_whole_queries_and_balance_rows():
    qids = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 1 + ["a"])
    shards = shard_by_query(qids, 2)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(qids)))
    owners = [{q for q in qids[rows]} for rows in shards]
    assert not owners[0] & owners[1]
    assert sorted(len(rows) for rows in shards) == [6, 7]
    assert [len(rows) for rows in shard_by_query(qids, 8)].count(0) == 4


def test_sharded_scoring_equals_single_process(saved, sharded):
    inp = frame()
    single = kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)(inp)
    out = sharded(inp)
    pd.testing.assert_frame_equal(out.drop(columns="score"), single.drop(columns="score"))
    # other processes, threads and batches: equal within float rounding, which differs between CPUs
    np.testing.assert_allclose(out["score"], single["score"], rtol=1e-5, atol=1e-5)
    again = sharded(inp.iloc[::-1])  # workers stay up between frames
    pd.testing.assert_frame_equal(again, out)


def test_a_shard_goes_to_its_worker_in_pieces_and_scores_as_one(sharded, monkeypatch):
    inp = frame()
    whole = sharded.score_pairs(inp["qid"], inp["query"], inp["text"])
    sent = []
    for pool in sharded._start():  # record what each submission carries to a worker
        submit = pool.submit
        monkeypatch.setattr(pool, "submit", lambda fn, queries, texts, submit=submit: (
            sent.append(len(queries)), submit(fn, queries, texts))[1])
    monkeypatch.setattr(sharded, "piece_rows", 4)  # each worker's rows in pieces of at most 4
    pieces = sharded.score_pairs(inp["qid"], inp["query"], inp["text"])
    assert sum(sent) == len(inp) and max(sent) <= 4 and len(sent) >= len(inp) // 4
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)


def test_sharded_scoring_answers_empty_frames_without_workers(saved):
    scorer = ShardedScorer(saved, workers=2)
    out = scorer(frame().iloc[:0])
    assert len(out) == 0 and {"qid", "docno", "score", "rank"} <= set(out.columns)
    assert scorer._pools is None
    single = kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)(frame().iloc[:0])
    assert list(out.columns) == list(single.columns)


def test_sharded_scoring_from_a_reranker_object_with_fewer_queries_than_workers(tiny_model):
    reranker = kdcl.CrossEncoder(tiny_model("bert"), device="cpu", verbose=False)
    inp = frame(1, 5)
    out = score_sharded(reranker, inp, workers=2, threads=1)
    np.testing.assert_allclose(out["score"], reranker(inp)["score"], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*bfloat16")  # CPUs without native bfloat16 warn that it is slow there
def test_sharded_bf16_scores_like_bf16_in_process(saved, one_thread):
    """The fast path's scores do not depend on the batch, so shards batching differently score as one process
    (one thread here as in the workers: bfloat16 rounding could carry a thread count's summation order)."""
    inp = frame()
    local = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "bf16")(inp)
    out = score_sharded(saved, inp, workers=2, threads=1, optimize="bf16")
    merged = local.merge(out, on=["qid", "docno"], suffixes=("_local", "_sharded"))
    assert len(merged) == len(inp)
    np.testing.assert_allclose(merged["score_sharded"], merged["score_local"], atol=1e-3)


def test_sharded_int8_scores_like_int8_in_process(saved):
    """Not bit for bit: dynamic quantisation scales activations per batch, and shards batch differently."""
    inp = frame()
    local = optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "int8")(inp)
    out = score_sharded(saved, inp, workers=2, threads=1, optimize="int8")
    merged = local.merge(out, on=["qid", "docno"], suffixes=("_local", "_sharded"))
    assert len(merged) == len(inp)
    spread = np.ptp(merged["score_local"])
    assert np.abs(merged["score_local"] - merged["score_sharded"]).max() < 0.15 * spread
    assert spearmanr(merged["score_local"], merged["score_sharded"]).statistic > 0.9


def test_sharding_refuses_optimised_rerankers_and_wrong_directories(saved, tmp_path):
    with pytest.raises(ValueError, match="float32 reranker"):
        ShardedScorer(optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)))
    with pytest.raises(FileNotFoundError, match="not a saved pyterrier_kdcl reranker"):
        ShardedScorer(tmp_path)


def test_sharded_scoring_refuses_empty_queries_as_the_cross_encoder_does(saved):
    """Its claim is the same scores as ``CrossEncoder``, which refuses an empty query (issue 23, item 10)."""
    inp = frame(2, 3)
    inp.loc[inp["qid"] == "q1", "query"] = "  "
    scorer = ShardedScorer(saved, workers=2)
    for ranker in (scorer, kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)):
        with pytest.raises(ValueError, match="3 rows have a 'query' that is empty or not a string"):
            ranker(inp)
    assert scorer._pools is None  # refused before any worker started


def test_a_worker_that_cannot_load_the_reranker_says_why(saved, tmp_path):
    """A failed setup was reported as a killed worker, "often the out-of-memory killer" (issue 23, item 10)."""
    import shutil

    broken = tmp_path / "reranker"
    shutil.copytree(saved, broken)
    scorer = ShardedScorer(broken, workers=2, threads=1)  # reads the settings: fine until the workers load it
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    try:
        with pytest.raises(RuntimeError, match=r"worker \d \(device 'cpu'\) could not load the reranker from "
                                               rf"{re.escape(str(broken))}: \w+Error: .*run the frame again") as err:
            scorer(frame(4, 3))
        assert "out-of-memory" not in str(err.value) and scorer._pools is None
        shutil.copy(saved / "model.safetensors", broken / "model.safetensors")
        out = scorer(frame(4, 3))  # new workers, now able to load it
        assert len(out) == 12
    finally:
        scorer.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat, proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the worker's CPU time from /proc")
def test_a_worker_killed_mid_scoring_names_its_shard_and_returns_no_frame(saved):
    """A real SIGKILL once the worker is busy with its shard (it has used CPU since the frame was sent)."""
    inp = frame(4, 500)
    rows = shard_by_query(inp["qid"].to_numpy(), 2)[1]
    qids = ", ".join(repr(q) for q in pd.unique(inp["qid"].iloc[rows]))
    scorer = ShardedScorer(saved, workers=2, threads=1)
    try:
        scorer(inp.head(2))  # the workers are up
        victim = scorer._pools[1].submit(os.getpid).result()
        idle = cpu_seconds(victim)

        def kill_once_busy():
            deadline = time.monotonic() + 120
            while cpu_seconds(victim) < idle + 0.1 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_once_busy)
        killer.start()
        expected = (rf"worker 1 \(device 'cpu'\) died while scoring its shard of {len(rows)} rows, 2 queries "
                    rf"\(qids {re.escape(qids)}\); no frame is returned.*run the frame again")
        with pytest.raises(RuntimeError, match=expected):
            scorer(inp)
        killer.join()
        out = scorer(inp.head(12))  # new workers
        single = kdcl.CrossEncoder.load(saved, device="cpu", verbose=False)(inp.head(12))
        np.testing.assert_allclose(out["score"], single["score"], rtol=1e-5, atol=1e-5)
    finally:
        scorer.close()
