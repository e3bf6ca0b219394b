"""Turning (query, document) pairs into model inputs: templates, truncation and padding.

Training and inference both go through :class:`PairEncoder`, so a model always sees its inputs in the same
form (Tevatron's bug log: a reranker trained on one token layout and served on another scores garbage).

Two layouts:

* ``template=None`` (encoder models): the tokenizer's own pair encoding, ``[CLS] query [SEP] document [SEP]``.
* ``template="query: {query} document: {text}"`` (decoder and recurrent models): the filled template with the
  tokenizer's EOS appended, so the last real token sees the whole pair (RankLLaMA's recipe).

Truncation always cuts the document, never the query: a query longer than the budget is cut only as far as
needed to leave room for the template and EOS. Documents far longer than the budget are cut to a prefix of
characters before tokenizing (a man page averages 34 KB; tokenizing all of it cost as much as the forward pass),
without changing a single id: see :meth:`PairEncoder.encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANKLLAMA_TEMPLATE = "query: {query} document: {text}"
_MIN_DOC_TOKENS = 8  # a query may never squeeze the document out entirely
_CHARS_PER_TOKEN = 12  # a generous bound: English averages 4-5 characters per word piece


@dataclass
class EncodedPair:
    input_ids: list[int]
    token_type_ids: list[int] | None


class PairEncoder:
    """Tokenizes pairs without padding, then pads batches of them into tensors."""

    def __init__(self, tokenizer, max_length: int, template: str | None = None, append_eos: bool = True):
        if template is not None and ("{query}" not in template or "{text}" not in template):
            raise ValueError(f"template must contain {{query}} and {{text}}, got {template!r}")
        if template is not None and template.index("{query}") > template.index("{text}"):
            raise ValueError("template must place {query} before {text}; truncation cuts the text")
        if max_length < 2 * _MIN_DOC_TOKENS:
            raise ValueError(f"max_length={max_length} is too small; use at least {2 * _MIN_DOC_TOKENS}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        self.append_eos = append_eos and template is not None and tokenizer.eos_token_id is not None
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; models.load_tokenizer sets one")

    # -- tokenization -------------------------------------------------------------------------------------
    def encode(self, queries: list[str], texts: list[str]) -> list[EncodedPair]:
        """Token ids of each pair, truncated to ``max_length``.

        A document longer than ``12 × max_length`` characters is tokenized from its prefix up to the last space
        before that point. With a tokenizer that splits words at whitespace first (WordPiece, byte-level BPE,
        Metaspace), a prefix ending at a space starts with the same tokens as the whole text, and the prefix
        holds about three times the tokens the budget takes. A pair whose prefix did not fill the budget (long
        unbroken strings) is encoded again from the whole text, so the ids are always the untruncated ones.
        """
        queries, texts = _valid_unicode(queries), _valid_unicode(texts)
        if not self._splits_at_whitespace():
            return self._encode(queries, texts)
        limit = _CHARS_PER_TOKEN * self.max_length
        cut = [t[: max(t.rfind(" ", 0, limit), 1)] if len(t) > limit else t for t in texts]
        pairs = self._encode(queries, cut)
        again = [i for i, pair in enumerate(pairs) if cut[i] is not texts[i] and len(pair.input_ids) < self.max_length]
        if again:
            redone = self._encode([queries[i] for i in again], [texts[i] for i in again])
            for i, pair in zip(again, redone):
                pairs[i] = pair
        return pairs

    def _encode(self, queries, texts):
        if self.template is None:
            return self._encode_native_pairs(queries, texts)
        return self._encode_template(queries, texts)

    def _splits_at_whitespace(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and backend.pre_tokenizer is not None

    def _encode_native_pairs(self, queries, texts):
        # The tokenizer's own post-processor adds [CLS]/[SEP] and token types exactly as tokenizer(q, d) would;
        # truncating the raw encodings first is what keeps the query whole.
        backend = self._backend()
        special = backend.num_special_tokens_to_add(is_pair=True)
        query_budget = self.max_length - special - _MIN_DOC_TOKENS
        q_encs = backend.encode_batch(list(queries), add_special_tokens=False)
        d_encs = backend.encode_batch(list(texts), add_special_tokens=False)
        with_types = "token_type_ids" in self.tokenizer.model_input_names
        out = []
        for q, d in zip(q_encs, d_encs):
            q.truncate(query_budget)
            d.truncate(self.max_length - special - len(q.ids))
            pair = backend.post_process(q, d, add_special_tokens=True)
            out.append(EncodedPair(pair.ids, pair.type_ids if with_types else None))
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
        tok = self.tokenizer
        head, tail = self.template.split("{text}", 1)
        heads = tok([head.format(query=q) for q in queries], add_special_tokens=True)["input_ids"]
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        eos = [tok.eos_token_id] if self.append_eos else []
        d_ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        fixed = len(tail_ids) + len(eos)
        out = []
        for h, d in zip(heads, d_ids):
            h = h[: self.max_length - fixed - _MIN_DOC_TOKENS]
            d = d[: self.max_length - fixed - len(h)]
            out.append(EncodedPair(h + d + tail_ids + eos, None))
        return out

    # -- batching -----------------------------------------------------------------------------------------
    def collate(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        """Right-pads a batch. Models read their score through the attention mask, never the pad id."""
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


def _valid_unicode(strings) -> list[str]:
    """Lone surrogates (text decoded with ``errors="surrogateescape"``) become "?": tokenizers refuse them."""
    strings = list(strings)
    try:
        "".join(strings).encode("utf-8")
        return strings
    except UnicodeEncodeError:
        return [s.encode("utf-8", "replace").decode("utf-8") for s in strings]
