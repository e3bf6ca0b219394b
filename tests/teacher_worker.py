"""Distils a tiny student from a composed teacher through a shared teacher cache; prints what its teacher scored.

Run by test_teachers.py as separate processes: ``teacher_worker.py MODEL_DIR CACHE_DIR FIRST LAST [SLEEP]`` trains
on queries FIRST..LAST-1 and prints one JSON line: the (query, docno, text) pairs this process's teacher scored.
"""

import json
import sys
import time
from pathlib import Path

import pyterrier as pt

sys.path.insert(0, str(Path(__file__).parent))
from training_data import training_frames  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402
from pyterrier_kdcl.training import teachers  # noqa: E402


class WordTeacher(pt.Transformer):
    """Scores a document by how often ``word`` occurs in it, times ``weight``; remembers the pairs it scored."""

    def __init__(self, word: str, weight: float, sleep: float = 0.0):
        self.word, self.weight, self.sleep = word, weight, sleep
        self.scored = []

    def transform(self, inp):
        time.sleep(self.sleep)  # slow enough that two processes score and write at the same time
        self.scored += list(zip(inp["query"], inp["docno"], inp["text"]))
        return inp.assign(score=[self.weight * t.count(self.word) for t in inp["text"]])

    def fingerprint(self) -> str:
        return f"{self.word}*{self.weight}"


def composed_teacher(sleep: float = 0.0):
    answer, page = WordTeacher("answer", 2.0, sleep), WordTeacher("page", 1.0, sleep)
    return answer + 0.5 * page, answer


def expected_score(text: str) -> float:
    return 2.0 * text.count("answer") + 0.5 * text.count("page")


def main(model_dir: str, cache_dir: str, first: int, last: int, sleep: float = 0.0) -> None:
    teachers.CHUNK_PAIRS = 4  # many small teacher calls and cache writes, interleaved with the other process
    res, qrels = training_frames(last)
    keep = [f"q{q}" for q in range(first, last)]
    res, qrels = res[res["qid"].isin(keep)], qrels[qrels["qid"].isin(keep)]
    teacher, counted = composed_teacher(sleep)
    student = kdcl.CrossEncoder(model_dir, verbose=False, max_length=32, device="cpu")
    trainer = kdcl.DistillationTrainer(student, teacher, group_size=4, batch_size=4, epochs=2, verbose=False,
                                       teacher_cache=cache_dir)
    log = trainer.fit(res, qrels)
    print(json.dumps({"scored": counted.scored, "steps": len(log)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *map(float, sys.argv[5:]))
