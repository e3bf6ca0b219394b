"""Probe (2026-11-29): the packaged MiniLMs as zero-shot bi-encoders (mean pooling, cosine, max_length 128) on the
first 80 queries of the man pages' dev test half, reranking BM25's top 20 (cpu-recipes' evaluation data).

Run from the repository root: ``python docs/results/cpu-recipes/probes/zero_shot_bi_encoders.py``; its output as
run is ``zero_shot_bi_encoders.out`` (the script was tidied after that run; the computation is the same).
"""

import ir_measures
import torch
from transformers import AutoModel, AutoTokenizer

from pyterrier_kdcl.experiment.config import load_config
from pyterrier_kdcl.experiment.runner import ExperimentRunner
from pyterrier_kdcl.offline.packaged_models import resolve_offline_model


def embed(tokenizer, model, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 64):
        batch = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None]
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def ndcg(qrels, run) -> float:
    qrels = qrels.rename(columns={"qid": "query_id", "docno": "doc_id", "label": "relevance"})
    run = run.rename(columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]]
    return ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10]


config = load_config("experiments/cpu-recipes.yaml")
topics, qrels, res = ExperimentRunner(config, "/tmp/l3probe", verbose=False).frames(config.evaluation.in_domain[0])
qids = sorted(topics.qid.unique())[:80]
res, qrels = res[res.qid.isin(qids)], qrels[qrels.qid.isin(qids)]
for name in ["minilm-l3", "minilm-l6"]:
    path = resolve_offline_model(name)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    scored = res.assign(score=(embed(tokenizer, model, list(res["query"]))
                               * embed(tokenizer, model, list(res["text"]))).sum(-1).numpy())
    print(name, {"nDCG@10": ndcg(qrels, scored)})
print("bm25", {"nDCG@10": ndcg(qrels, res)})
