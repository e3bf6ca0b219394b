"""The man-page collection: query = a page's NAME description, relevant document = the rest of that page.

``read \\- read from a file descriptor`` gives the query ``read from a file descriptor`` and the
document ``read(2)``: the page's text without its NAME section, DESCRIPTION first (rerankers truncate
at a few hundred tokens, and SYNOPSIS is mostly prototypes), then the other sections in page order.
All pages form one corpus shared by the three splits; queries are split by a stable hash.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from . import roff
from .collection import Collection, leaks, normalise
from .debian import Package

# Packages whose man pages have natural English NAME lines; a tuple lists alternatives, newest last.
PACKAGES: tuple[str | tuple[str, ...], ...] = (
    "manpages", "manpages-dev", "perl-doc", "git-man", "openssl", "libssl-doc", "systemd", "libx11-doc",
    "libxt-dev", "x11-xserver-utils", "coreutils", "util-linux", "procps", "iproute2", "findutils",
    "tcl8.6-doc", "tk8.6-doc", "libcurl4-doc", ("postgresql-client-15", "postgresql-client-16",
                                                "postgresql-client-17"),
    "debhelper", "devscripts", "dpkg-dev", "libpam0g-dev",
)
# Sections that are the same boilerplate on many pages: they add nothing a reader searches for.
DROPPED_SECTIONS = {"NAME", "COLOPHON", "AUTHOR", "AUTHORS", "COPYRIGHT", "LICENSE", "LICENCE",
                    "REPORTING BUGS", "AVAILABILITY", "COPYRIGHT AND LICENSE", "NOTES ON THIS MANUAL PAGE"}
# perlfaq pages are the kdcl/faq/perl collection: keep them out of the in-domain corpus
EXCLUDED_PAGES = re.compile(r"^perlfaq\d*\.")
SPLITS = (("train", 70), ("dev", 80), ("test", 100))  # cumulative percent of the stable hash
MIN_DOC_WORDS = 20
MAX_RELEVANT = 3  # a description shared by more pages is too generic to be a query


def split_of(key: str) -> str:
    """``train``/``dev``/``test`` for a page id, from the first 8 hex digits of its SHA-1 (≈70/10/20)."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, upto in SPLITS if bucket < upto)


def man_files(pkg: Package) -> list[Path]:
    """English man pages of a package: files in ``…/man/man<section>/`` (translations sit deeper)."""
    found = [p for p in pkg.files("usr/share") if p.parent.name.startswith("man") and p.parent.parent.name == "man"]
    return sorted(found, key=lambda p: p.name)


def page_name(path: Path) -> tuple[str, str]:
    """``read.2.gz`` → ``("read", "2")``; ``File::Spec.3perl.gz`` → ``("File::Spec", "3perl")``."""
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    name, _, section = stem.rpartition(".")
    return (name, section) if name else (stem, "")


def name_line(paragraphs: list[str]) -> tuple[str, str] | None:
    """The NAME section's ``names - description`` split in two, or None when it has no dash."""
    text = " ".join(paragraphs)
    m = re.match(r"^(.*?)\s+(?:-|--|\u2014|\u2013)\s+(.+)$", text)
    if not m:
        return None
    return m.group(1).strip(), m.group(2).strip().rstrip(".").strip()


def page_text(secs: list[tuple[str, list[str]]]) -> str:
    """The document: DESCRIPTION's paragraphs first, then each other kept section under its heading."""
    parts: list[str] = []
    for heading, paras in secs:
        if heading == "DESCRIPTION" and paras:
            parts.extend(paras)
    for heading, paras in secs:
        if heading in DROPPED_SECTIONS or heading == "DESCRIPTION" or not paras:
            continue
        parts.append(heading if heading else "")
        parts.extend(paras)
    return "\n".join(p for p in parts if p).strip()


def parse_page(source: str) -> tuple[str, str] | None:
    """(description, document text) of one man page, or None for aliases, mdoc pages and stubs."""
    if roff.is_redirect(source) or roff.is_mdoc(source):
        return None
    secs = roff.sections(source)
    name = next((paras for heading, paras in secs if heading == "NAME"), None)
    parsed = name_line(name) if name else None
    if parsed is None:
        return None
    text = page_text(secs)
    if len(text.split()) < MIN_DOC_WORDS:
        return None
    return parsed[1], text


def good_query(description: str) -> bool:
    """A usable query: two to forty words, mostly letters."""
    words = description.split()
    letters = sum(c.isalpha() for c in description)
    return 2 <= len(words) <= 40 and letters >= 0.6 * len(description)


def build(fetch: Callable[[str | tuple[str, ...]], Package], packages: Iterable = PACKAGES) -> Collection:
    """The man-page collection from ``packages`` (each fetched with ``fetch``)."""
    stats: dict[str, int] = defaultdict(int)
    docs: dict[str, dict] = {}
    body_seen: dict[str, str] = {}
    described: dict[str, list[tuple[str, str]]] = defaultdict(list)  # normalised query -> [(docno, query)]
    sources = []
    for spec in packages:
        pkg = fetch(spec)
        sources.append(pkg.source())
        for path in man_files(pkg):
            stats["files"] += 1
            name, section = page_name(path)
            if EXCLUDED_PAGES.match(path.name):
                stats["excluded (perlfaq, in kdcl/faq/perl)"] += 1
                continue
            parsed = parse_page(pkg.read_text(path))
            if parsed is None:
                stats["dropped: alias, mdoc, no NAME dash or stub"] += 1
                continue
            description, text = parsed
            key = normalise(text)
            if key in body_seen:
                stats["dropped: duplicate body"] += 1
                continue
            docno = f"{pkg.name}/{path.name[:-3] if path.name.endswith('.gz') else path.name}"
            body_seen[key] = docno
            docs[docno] = {"docno": docno, "title": f"{name}({section})", "text": text}
            if good_query(description):
                described[normalise(description)].append((docno, description))
            else:
                stats["no query: description too short, long or symbolic"] += 1
    queries: dict[str, dict[str, str]] = {s: {} for s, _ in SPLITS}
    qrels: dict[str, dict[str, list[str]]] = {s: {} for s, _ in SPLITS}
    for key in sorted(described):
        pages = sorted(described[key])
        if len(pages) > MAX_RELEVANT:
            stats["no query: description shared by more than 3 pages"] += len(pages)
            continue
        relevant = [docno for docno, _ in pages]
        if any(leaks(pages[0][1], docs[d]["text"]) for d in relevant):
            stats["no query: description verbatim in its page"] += len(pages)
            continue
        stats["duplicate descriptions merged"] += len(pages) - 1
        qid = relevant[0]
        split = split_of(qid)
        queries[split][qid] = pages[0][1]
        qrels[split][qid] = relevant
    return Collection(
        name="manpages",
        description="Debian man pages: NAME description -> the page (DESCRIPTION first)",
        docs=list(docs.values()), queries=queries, qrels=qrels, sources=sources, stats=dict(sorted(stats.items())),
    )
