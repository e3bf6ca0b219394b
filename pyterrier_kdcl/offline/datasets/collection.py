"""A built collection on disk: docs, queries and qrels per split, and its metadata.

Layout of one collection folder::

    docs.jsonl                one {"docno", "title", "text"} object a line, sorted by docno
    <split>.queries.tsv       qid <TAB> query, sorted by qid
    <split>.qrels             TREC qrels (qid 0 docno 1), binary
    meta.json                 sources (package, version, licence), counts, file hashes, content hash
    build.json                when and where it was built: the only file that differs between builds

Everything but ``build.json`` is a pure function of the source packages, so two builds are
byte-identical. A collection is written into a temporary sibling folder and renamed into place, so a
reader never sees a half-written one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pyterrier_kdcl.paths import finalized_directory

DATA_FILES = ("docs.jsonl",)
META = "meta.json"
BUILD_INFO = "build.json"


@dataclass
class Collection:
    """What a builder returns: documents, and queries with their relevant documents per split."""

    name: str
    description: str
    docs: list[dict]  # {"docno", "title", "text"}
    queries: dict[str, dict[str, str]]  # split -> qid -> query text
    qrels: dict[str, dict[str, list[str]]]  # split -> qid -> relevant docnos
    sources: list[dict]
    stats: dict = field(default_factory=dict)  # what the build dropped, and why

    def counts(self) -> dict:
        out = {"docs": len(self.docs)}
        for split in sorted(self.queries):
            out[split] = {"queries": len(self.queries[split]),
                          "qrels": sum(len(v) for v in self.qrels[split].values())}
        return out


def normalise(text: str) -> str:
    """Lower-cased words joined by single spaces: the form used for duplicate and leak checks."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def leaks(query: str, doc_text: str) -> bool:
    """True when the query's words appear, in order and adjacent, inside the document."""
    q = normalise(query)
    return bool(q) and f" {q} " in f" {normalise(doc_text)} "


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_files(col: Collection, folder: Path, builder_version: int) -> None:
    with open(folder / "docs.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for doc in sorted(col.docs, key=lambda d: d["docno"]):
            row = {"docno": doc["docno"], "title": doc.get("title", ""), "text": doc["text"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split in sorted(col.queries):
        with open(folder / f"{split}.queries.tsv", "w", encoding="utf-8", newline="\n") as f:
            for qid in sorted(col.queries[split]):
                f.write(f"{qid}\t{col.queries[split][qid]}\n")
        with open(folder / f"{split}.qrels", "w", encoding="utf-8", newline="\n") as f:
            for qid in sorted(col.qrels[split]):
                for docno in sorted(col.qrels[split][qid]):
                    f.write(f"{qid} 0 {docno} 1\n")
    names = sorted(p.name for p in folder.iterdir())
    files = {name: _sha256(folder / name) for name in names}
    content = hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in files.items()).encode()).hexdigest()
    meta = {
        "name": col.name,
        "description": col.description,
        "builder_version": builder_version,
        "splits": sorted(col.queries),
        "counts": col.counts(),
        "sources": col.sources,
        "stats": col.stats,
        "files": files,
        "content_sha256": content,
    }
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    build = {"built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host_python": platform.python_version(), "content_sha256": content}
    (folder / BUILD_INFO).write_text(json.dumps(build, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write(col: Collection, target: Path, builder_version: int) -> Path:
    """Write ``col`` to folder ``target`` atomically, replacing an older build there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    with finalized_directory(target) as tmp:
        _write_files(col, tmp, builder_version)
        if target.exists():
            os.replace(target, old)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_meta(folder: Path) -> dict | None:
    """The metadata of the collection built in ``folder``, or None when there is none."""
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
