"""Probe (2026-12-04): does e5-small learn above BM25 in domain with CL alone? One seed per pooling.

kdcl.ContrastiveTrainer on the first 100 usable queries of kdcl/manpages/train (groups of 1 positive + 7 negatives
from PISA BM25's top 30), 4 queries a step, 2 epochs (50 steps, negatives drawn afresh each epoch), max_length 128,
bf16 autocast, full fine-tuning at lr 1e-4 with the new head at 1e-2 (MiniLM-L6's recipe in
experiments/cpu-architectures.yaml), warm-up 10%; validation nDCG@10 every 25 steps on the first 40 queries of
kdcl/manpages/dev reranking BM25's top 10, against BM25's own nDCG@10 on those 40.

    python docs/results/e5-small/cl_probe.py mean          # e5's own pooling
    python docs/results/e5-small/cl_probe.py classifier    # [CLS] through a fresh pooler and head
"""

import sys
import tempfile

sys.path.insert(0, "benchmarks")
import ir_measures  # noqa: E402
import pyterrier as pt  # noqa: E402
from common import bm25_frame, machine  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402
from pyterrier_kdcl.training.groups import GroupSampler  # noqa: E402

pooling = sys.argv[1] if len(sys.argv) > 1 else "mean"
qrels = pt.get_dataset("irds:kdcl/manpages/train").get_qrels()
frame = bm25_frame("kdcl/manpages/train", queries=130, depth=30)
usable = [g.qid for g in GroupSampler(frame, qrels, group_size=8, seed=0).epoch(0)]
frame = frame[frame["qid"].isin(usable[:100])]
dev = pt.get_dataset("irds:kdcl/manpages/dev")
va_topics = dev.get_topics().head(40)
va_qrels = dev.get_qrels().query("qid in @va_topics.qid")
va_res = bm25_frame("kdcl/manpages/dev", topics=va_topics, depth=10)
bm25 = ir_measures.calc_aggregate(
    [ir_measures.nDCG @ 10], va_qrels.rename(columns={"qid": "query_id", "docno": "doc_id", "label": "relevance"}),
    va_res.rename(columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]])
print(machine())
print(f"{frame.qid.nunique()} training queries; BM25 nDCG@10 on the 40 validation queries: "
      f"{bm25[ir_measures.nDCG @ 10]:.4f}", flush=True)
reranker = kdcl.CrossEncoder("e5-small", pooling=pooling, max_length=128, device="cpu", verbose=False)
with tempfile.TemporaryDirectory() as out:
    trainer = kdcl.ContrastiveTrainer(
        reranker, group_size=8, batch_size=4, epochs=2, warmup_ratio=0.1, seed=1, precision="bf16",
        learning_rate=1e-4, head_learning_rate=1e-2, validate_every=25, output_dir=out, verbose=False)
    log = trainer.fit(frame, qrels, va_res, va_qrels)
print(f"e5-small pooling={pooling}:")
print(log[["step", "epoch", "loss", "metric", "seconds"]].dropna(subset=["metric"]).to_string(index=False))
print(f"loss first/last 5 steps: {log['loss'].head(5).mean():.3f} / {log['loss'].tail(5).mean():.3f}; "
      f"{log['seconds'].iloc[-1]:.0f} s in all")
