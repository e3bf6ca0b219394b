"""Turning (query, document) pairs into model inputs: templates, truncation and padding.

Training and inference both go through :class:`PairEncoder`, so a model always sees its inputs in the same
form (Tevatron's bug log: a reranker trained on one token layout and served on another scores garbage).

Two layouts:

* ``template=None`` (encoder models): the tokenizer's own pair encoding, ``[CLS] query [SEP] document [SEP]``.
* ``template="query: {query} document: {text}"`` (decoder and recurrent models): the filled template with the
  tokenizer's EOS appended, so the last real token sees the whole pair (RankLLaMA's recipe).

Truncation (see :func:`split_budget`): the special tokens, the template's own words and the EOS are always kept;
the rest of ``max_length`` (the *budget*) goes to the query and the document. When they do not fit, the longer of
the two is cut first (tokenizers' ``longest_first``): a query of up to half the budget is never cut and the
document keeps the rest; a longer query is cut at its end to half the budget, or to what a shorter document
leaves. Pairs are always padded on the right, whatever the tokenizer's ``padding_side``. Documents far longer than
the budget are cut to a prefix of characters before tokenizing (a man page averages 34 KB; tokenizing all of it
cost as much as the forward pass), without changing a single id: see :meth:`PairEncoder.encode`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

RANKLLAMA_TEMPLATE = "query: {query} document: {text}"
_MIN_MAX_LENGTH = 16
_MIN_BUDGET = 8  # tokens left for query and document after the special tokens, the template and EOS
_CHARS_PER_TOKEN = 12  # a generous bound: English averages 4-5 characters per word piece
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class EncodedPair:
    input_ids: list[int]
    token_type_ids: list[int] | None
    query_tokens: int = 0  # tokens of the query and of the document before truncation
    document_tokens: int = 0


def split_budget(query_tokens: int, document_tokens: int, budget: int) -> tuple[int, int]:
    """Tokens the query and the document keep when together they may take ``budget`` tokens.

    The rule of the ``tokenizers`` library's ``longest_first`` truncation, decided at once: nothing is cut when
    both fit; otherwise the longer of the two is cut, down to the length of the shorter or to half the budget,
    whichever is more, and when both are longer than half the budget, the shorter keeps ``budget // 2`` tokens
    and the longer the rest. A query of at most ``budget // 2`` tokens is never cut.

    Example::

        split_budget(10, 500, 100) == (10, 90)     # a short query is never cut
        split_budget(300, 500, 100) == (50, 50)    # two long texts share the budget
        split_budget(300, 20, 100) == (80, 20)     # a long query keeps what a short document leaves
    """
    if query_tokens + document_tokens <= budget:
        return query_tokens, document_tokens
    half = budget // 2
    if query_tokens > document_tokens:
        return budget - min(document_tokens, half), min(document_tokens, half)
    return min(query_tokens, half), budget - min(query_tokens, half)


class PairEncoder:
    """Tokenizes pairs without padding, then pads batches of them into tensors (always on the right)."""

    def __init__(self, tokenizer, max_length: int, template: str | None = None, append_eos: bool = True):
        if template is not None and ("{query}" not in template or "{text}" not in template):
            raise ValueError(f"template must contain {{query}} and {{text}}, got {template!r}")
        if template is not None and template.index("{query}") > template.index("{text}"):
            raise ValueError("template must place {query} before {text}; truncation cuts the text")
        if max_length < _MIN_MAX_LENGTH:
            raise ValueError(f"max_length={max_length} is too small; use at least {_MIN_MAX_LENGTH}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; models.load_tokenizer sets one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        self.append_eos = append_eos and template is not None and tokenizer.eos_token_id is not None
        if template is not None:
            self._head, self._tail = template.split("{text}", 1)
            self._tail_ids = tokenizer(self._tail, add_special_tokens=False)["input_ids"] if self._tail else []
            self._eos = [tokenizer.eos_token_id] if self.append_eos else []
            self._markers = len(tokenizer(self._head.format(query=""), add_special_tokens=True)["input_ids"])
            kept = self._markers + len(self._tail_ids) + len(self._eos)
        else:
            kept = self._backend().num_special_tokens_to_add(is_pair=True)
        self.budget = max_length - kept
        if self.budget < _MIN_BUDGET:
            raise ValueError(f"max_length={max_length} leaves {self.budget} tokens for query and document after "
                             f"{kept} tokens of special tokens and template; use max_length={kept + _MIN_BUDGET} "
                             "or more")

    # -- tokenization -------------------------------------------------------------------------------------
    def encode(self, queries: list[str], texts: list[str]) -> list[EncodedPair]:
        """Token ids of each pair, cut to ``max_length`` as :func:`split_budget` says.

        A document longer than ``12 × max_length`` characters is tokenized from its prefix up to the last space
        before that point. With a tokenizer that splits words at whitespace first (WordPiece, byte-level BPE,
        Metaspace), a prefix ending at a space starts with the same tokens as the whole text, and the prefix
        holds about three times the tokens the budget takes. A pair for which the prefix might not decide the cut
        as the whole text would (a prefix that the budget did not cut, or with fewer tokens than the query: long
        unbroken strings, lines without spaces) is encoded again from a prefix 16 times longer, and so on up to the
        whole text, so the ids are always the untruncated ones. Growing the prefix instead of tokenizing the whole
        text at once keeps memory bounded: a 270 KB man page whose first space came after 62 characters cost
        60-150 MB of token objects per chunk that held it (issue 16).
        """
        queries, texts = _valid_unicode(queries), _valid_unicode(texts)
        if not self._splits_at_whitespace():
            return self._encode(queries, texts)
        pairs: list[EncodedPair] = [None] * len(texts)
        rows, limit = list(range(len(texts))), _CHARS_PER_TOKEN * self.max_length
        while rows:
            cut = [_prefix(texts[i], limit) for i in rows]
            for i, pair in zip(rows, self._encode([queries[i] for i in rows], cut)):
                pairs[i] = pair
            rows = [i for i, text in zip(rows, cut) if text is not texts[i] and not self._decided_by_prefix(pairs[i])]
            limit *= 16
        return pairs

    def _decided_by_prefix(self, pair: EncodedPair) -> bool:
        # split_budget gives a document at least as long as the query, and too long to fit, the budget minus the
        # query's share whatever its length: more tokens after the prefix change nothing
        n_query, n_document = pair.query_tokens, pair.document_tokens
        return n_document >= n_query and n_query + n_document > self.budget

    def _encode(self, queries, texts):
        if self.template is None:
            return self._encode_native_pairs(queries, texts)
        return self._encode_template(queries, texts)

    def _splits_at_whitespace(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and backend.pre_tokenizer is not None

    def _encode_native_pairs(self, queries, texts):
        # The tokenizer's own post-processor adds [CLS]/[SEP] and token types exactly as tokenizer(q, d) would;
        # cutting the raw encodings first is tokenizer(q, d, truncation="longest_first"), without padding.
        backend = self._backend()
        q_encs = backend.encode_batch(list(queries), add_special_tokens=False)
        d_encs = backend.encode_batch(list(texts), add_special_tokens=False)
        with_types = "token_type_ids" in self.tokenizer.model_input_names
        out = []
        for q, d in zip(q_encs, d_encs):
            n_query, n_document = len(q.ids), len(d.ids)
            q_keep, d_keep = split_budget(n_query, n_document, self.budget)
            if q_keep < n_query:
                q.truncate(q_keep)
            if d_keep < n_document:
                d.truncate(d_keep)
            pair = backend.post_process(q, d, add_special_tokens=True)
            out.append(EncodedPair(pair.ids, pair.type_ids if with_types else None, n_query, n_document))
        return out

    def _backend(self):
        if getattr(self, "_backend_tokenizer", None) is None:
            if not hasattr(self.tokenizer, "backend_tokenizer"):
                raise TypeError(f"{type(self.tokenizer).__name__} has no fast (tokenizers) backend; pass a template")
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            self._backend_tokenizer = backend
        return self._backend_tokenizer

    def _encode_template(self, queries, texts):
        # The head (the template up to {text}, the query filled in) is tokenized as one string, as RankLLaMA does;
        # the query's tokens are those it adds to the head of an empty query.
        heads = self.tokenizer([self._head.format(query=q) for q in queries], add_special_tokens=True)["input_ids"]
        d_ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        room = self.max_length - len(self._tail_ids) - len(self._eos)  # for the head and the document
        out = []
        for query, h, d in zip(queries, heads, d_ids):
            n_query = max(len(h) - self._markers, 0)
            q_keep, _ = split_budget(n_query, len(d), self.budget)
            if q_keep < n_query:
                h = self._head_with_query_cut(query, self._markers + q_keep)
            ids = h + d[: room - len(h)] + self._tail_ids + self._eos
            out.append(EncodedPair(ids, None, n_query, len(d)))
        return out

    def _head_with_query_cut(self, query: str, limit: int) -> list[int]:
        """The head's ids with the longest start of ``query`` that keeps it within ``limit`` tokens, cut where one
        of the query's own tokens ends (a word, with a slow tokenizer); the template's words stay whole."""
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            offsets = tok(query, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            ends = sorted({end for _, end in offsets})
        else:
            ends = [match.end() for match in re.finditer(r"\S+", query)]

        def head(n_ends: int) -> list[int]:
            cut = query[: ends[n_ends - 1]] if n_ends else ""
            return tok(self._head.format(query=cut), add_special_tokens=True)["input_ids"]

        lo, hi = 0, len(ends)  # head(0) is the template alone, which fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(head(mid)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return head(lo)

    # -- batching -----------------------------------------------------------------------------------------
    def collate(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        """Pads a batch on the right, whatever the tokenizer's ``padding_side``: a decoder's positions then count
        from the first token of every pair, and models read their score through the attention mask."""
        width = max(len(p.input_ids) for p in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        types = torch.zeros((len(pairs), width), dtype=torch.long) if pairs[0].token_type_ids is not None else None
        for row, pair in enumerate(pairs):
            n = len(pair.input_ids)
            ids[row, :n] = torch.tensor(pair.input_ids)
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(pair.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def batches_by_length(self, pairs: list[EncodedPair], batch_size: int):
        """Yields (row positions, batch) with pairs sorted by length, so little compute goes to padding."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids), reverse=True)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield rows, self.collate([pairs[i] for i in rows])


def _prefix(text: str, limit: int) -> str:
    """``text`` itself when it has at most ``limit`` characters, else its start up to the last space before
    ``limit`` (one character when there is none: too short to decide, so encode tries a longer prefix)."""
    return text if len(text) <= limit else text[: max(text.rfind(" ", 0, limit), 1)]


def _valid_unicode(strings) -> list[str]:
    """Lone surrogates (text decoded with ``errors="surrogateescape"``) become "?": tokenizers refuse them.

    Checked string by string, without a copy: joining a chunk's documents to test them at once held a
    50-70 MB text as a 200-250 MB UCS-4 string plus its UTF-8 bytes, the peak of scoring (issue 16)."""
    return [s if s.isascii() or not _SURROGATE.search(s) else s.encode("utf-8", "replace").decode("utf-8")
            for s in strings]
