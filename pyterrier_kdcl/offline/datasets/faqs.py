"""FAQ collections, out of domain for the man pages: query = a question, relevant document = its answer.

Three FAQs written by people for people, each shipped by a Debian package:

- ``python``: the Python FAQ, reStructuredText sources in ``python3.X-doc``;
- ``debian``: the Debian FAQ, plain text in ``debian-faq``;
- ``perl``: perlfaq1–9, POD sources in ``perl-doc``.

Every answer is one document (title: the FAQ chapter); every question whose answer has some prose is
one query with that answer as its only relevant document. All queries form the single split ``all``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable

from .collection import Collection, leaks, normalise
from .debian import Package

MIN_ANSWER_WORDS = 8
SPLIT = "all"
PYTHON_DOC = ("python3.11-doc", "python3.12-doc", "python3.13-doc")

# --- reStructuredText (Python FAQ) -------------------------------------------------------------

_RST_UNDERLINE = re.compile(r"^([=\-~^*\"+#`'.:])\1{2,}\s*$")


def rst_to_text(text: str) -> str:
    """reST markup → plain text: roles, links, directives and emphasis reduced to their words."""
    text = re.sub(r"^\.\. (_[^:]*:|\|[^|]*\||index::|only::|contents::|highlight::|seealso::|note::"
                  r"|versionadded::|versionchanged::|deprecated::|code-block::|doctest::|testcode::)[^\n]*$",
                  "", text, flags=re.M)
    text = re.sub(r"^\.\. [a-z-]+::[^\n]*$", "", text, flags=re.M)
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)\s*<[^>]*>`", r"\1", text)  # :role:`title <target>`
    text = re.sub(r":[a-z:]+:`[~!]?([^`]*)`", r"\1", text)  # :func:`name`
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"::\s*$", ":", text, flags=re.M)
    return text


def _rst_sections(source: str) -> list[tuple[int, str, str]]:
    """``(level, heading, body)`` for each heading of a reST file; levels in order of first use."""
    lines = source.splitlines()
    styles: list[str] = []
    heads: list[tuple[int, int, int, str]] = []  # (first line, first line after it, level, heading)
    i = 0
    while i < len(lines) - 1:
        over = _RST_UNDERLINE.match(lines[i])
        if over and i + 2 < len(lines) and _RST_UNDERLINE.match(lines[i + 2]) and lines[i + 1].strip():
            style, title, nxt = "over" + over.group(1), lines[i + 1].strip(), i + 3
        else:
            under = _RST_UNDERLINE.match(lines[i + 1])
            if not (under and lines[i].strip() and not _RST_UNDERLINE.match(lines[i])
                    and len(lines[i + 1].strip()) >= len(lines[i].strip())):
                i += 1
                continue
            style, title, nxt = under.group(1), lines[i].strip(), i + 2
        if style not in styles:
            styles.append(style)
        heads.append((i, nxt, styles.index(style), title))
        i = nxt
    ends = [h[0] for h in heads[1:]] + [len(lines)]
    pairs = zip(heads, ends, strict=True)
    return [(level, title, "\n".join(lines[start:end])) for (_, start, level, title), end in pairs]


def python_pairs(pkg: Package) -> Iterable[tuple[str, str, str]]:
    """(chapter, question, answer) from the Python FAQ's reST sources."""
    for path in pkg.files("usr/share/doc", "*.rst.txt"):
        if path.parent.name != "faq" or path.name.startswith("index."):
            continue
        sections = _rst_sections(pkg.read_text(path))
        chapter = sections[0][1] if sections else path.stem
        deepest = max((level for level, _, _ in sections), default=0)
        for level, title, body in sections[1:]:
            if title.endswith("?") or level == deepest:
                yield chapter, rst_to_text(title), rst_to_text(body)


# --- plain text (Debian FAQ) -------------------------------------------------------------------

_DEBIAN_HEAD = re.compile(r"^(\d+)((?:\.\d+)+)\. (\S.*)$")


def debian_pairs(pkg: Package) -> Iterable[tuple[str, str, str]]:
    """(chapter, question, answer) from the text Debian FAQ: numbered headings, indented answers."""
    path = next(p for p in pkg.files("usr/share/doc", "debian-faq.en.txt.gz"))
    lines = pkg.read_text(path).replace("\xa0", " ").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Chapter 1. "))  # after the contents
    chapters: dict[str, str] = {}
    current: list[str] | None = None
    pairs: list[list] = []
    i = start
    while i < len(lines):
        line = lines[i]
        chapter = re.match(r"^Chapter (\d+)\. (\S.*)$", line)
        head = _DEBIAN_HEAD.match(line)
        if chapter:
            chapters[chapter.group(1)] = chapter.group(2).strip()
            current = None
        elif head:
            title = [head.group(3)]
            while i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].startswith(" "):
                i += 1
                title.append(lines[i].strip())
            current = []
            pairs.append([chapters.get(head.group(1), ""), " ".join(title), current])
        elif current is not None:
            current.append(line)
        i += 1
    for chapter, question, body in pairs:
        yield chapter, re.sub(r"/ ", "/", question), "\n".join(body)  # undo wrapping after a slash


# --- POD (perlfaq) -----------------------------------------------------------------------------

def pod_to_text(text: str) -> str:
    """POD formatting codes → their text (``C<x>``, ``L<text|target>``, ``E<gt>``, …), commands dropped."""
    escapes = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}
    text = re.sub(r"^=(?:over|back|item|for|begin|end|cut|pod)\b[^\n]*$", "", text, flags=re.M)
    for _ in range(4):  # nested codes, innermost first
        text = re.sub(r"[A-Z]<<+\s(.*?)\s>>+", r"\1", text, flags=re.S)
        text = re.sub(r"E<([a-z]+|\d+)>", lambda m: escapes.get(m.group(1), chr(int(m.group(1)))
                                                           if m.group(1).isdigit() else ""), text)
        text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)
        text = re.sub(r"L<\"?([^<>\"]*)\"?>", r"\1", text)
        text = re.sub(r"[BCIFSXZ]<([^<>]*)>", r"\1", text)
    return text


def perl_pairs(pkg: Package) -> Iterable[tuple[str, str, str]]:
    """(chapter, question, answer) from perlfaq1–9: each ``=head2`` is a question."""
    for path in pkg.files("usr/share/perl", "perlfaq[1-9].pod"):
        source = pkg.read_text(path)
        name = re.search(r"^=head1 NAME\s+(\S+ - )?(.*)$", source, flags=re.M)
        chapter = name.group(2).strip() if name else path.stem
        for block in re.split(r"^(?==head[12] )", source, flags=re.M):
            m = re.match(r"=head2 (.*)\n", block)
            if m:
                yield chapter, pod_to_text(m.group(1)).strip(), pod_to_text(block[m.end():])


# --- collection --------------------------------------------------------------------------------

def _paragraphs(text: str) -> str:
    """Blank-line separated paragraphs, each on one line."""
    paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paras if p)


def assemble(name: str, description: str, pkg: Package, pairs: Iterable[tuple[str, str, str]]) -> Collection:
    """A collection from (chapter, question, answer) triples: one doc per answer, one query per question."""
    stats: dict[str, int] = defaultdict(int)
    docs, queries, qrels = [], {}, {}
    seen_q: set[str] = set()
    seen_a: set[str] = set()
    for n, (chapter, question, answer) in enumerate(pairs, start=1):
        question, answer = re.sub(r"\s+", " ", question).strip(), _paragraphs(answer)
        stats["questions"] += 1
        if len(answer.split()) < MIN_ANSWER_WORDS:
            stats["dropped: answer shorter than 8 words"] += 1
            continue
        if normalise(question) in seen_q or normalise(answer) in seen_a:
            stats["dropped: duplicate question or answer"] += 1
            continue
        if leaks(question, answer):
            stats["dropped: question verbatim in its answer"] += 1
            continue
        seen_q.add(normalise(question))
        seen_a.add(normalise(answer))
        docno, qid = f"{name}-a{n:03d}", f"{name}-q{n:03d}"
        docs.append({"docno": docno, "title": chapter, "text": answer})
        queries[qid] = question
        qrels[qid] = [docno]
    return Collection(name=f"faq-{name}", description=description, docs=docs, queries={SPLIT: queries},
                      qrels={SPLIT: qrels}, sources=[pkg.source()], stats=dict(sorted(stats.items())))


FAQS: dict[str, tuple[str | tuple[str, ...], Callable[[Package], Iterable], str]] = {
    "python": (PYTHON_DOC, python_pairs, "The Python FAQ: question -> its answer"),
    "debian": ("debian-faq", debian_pairs, "The Debian GNU/Linux FAQ: question -> its answer"),
    "perl": ("perl-doc", perl_pairs, "perlfaq1-9: question -> its answer"),
}


def build(name: str, fetch: Callable[[str | tuple[str, ...]], Package]) -> Collection:
    """The FAQ collection ``name`` (one of :data:`FAQS`)."""
    package, pairs, description = FAQS[name]
    pkg = fetch(package)
    return assemble(name, description, pkg, pairs(pkg))
