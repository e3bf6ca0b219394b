"""A small synthetic training set whose positives a tiny model can learn to find in a few dozen steps, and a teacher
that finds them."""

import pandas as pd
import pyterrier as pt

WORDS = "read write open close list copy move print change install remove link".split()


def training_frames(n_queries: int = 24, depth: int = 8, positive_rank: int = 5):
    """Result frame (qid, query, docno, text, score, rank) and qrels: one positive per query at positive_rank."""
    rows, qrels = [], []
    for q in range(n_queries):
        word = WORDS[q % len(WORDS)]
        others = [w for w in WORDS if w != word]
        for k in range(depth):
            text = f"the answer to {word}" if k == positive_rank else f"a page on how to {others[(q + k) % 11]}"
            rows.append({"qid": f"q{q}", "query": f"{word} a file", "docno": f"d{q}-{k}", "text": text,
                         "score": float(depth - k), "rank": k})
        qrels.append({"qid": f"q{q}", "docno": f"d{q}-{positive_rank}", "label": 1})
    return pd.DataFrame(rows), pd.DataFrame(qrels)


class CountingTeacher(pt.Transformer):
    """A teacher that prefers documents containing 'answer', and counts the rows it was asked to score."""

    def __init__(self):
        self.rows = 0

    def transform(self, inp):
        self.rows += len(inp)
        return inp.assign(score=[3.0 if "answer" in t else float(len(t) % 3) for t in inp["text"]])

    def __repr__(self):
        return "CountingTeacher()"
