"""A `tokenizers.Tokenizer` (the Rust library) built from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special ids sit
under llama.cpp's `tokenizer.ggml.*` keys, and the text splitting rule is only named
(`tokenizer.ggml.pre`). We rebuild the tokenizer each family was trained with:

- `gpt2` (byte-level BPE): the file's merges; the pre-tokenizer regex of the named family,
  as llama.cpp applies it (smollm/starcoder split every digit first; llama-bpe and qwen2
  use their tokenizer.json regexes; gpt2 the GPT-2 one).
- `llama` (SentencePiece BPE): merges recovered from the token scores (higher score merges
  first), byte fallback for unknown bytes, a "▁" word prefix unless the file says
  `add_space_prefix = false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn in the chat formats of the common families; llama.cpp stops
# on these too even when the file names another eos.
_END_OF_TURN_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
    "<｜end▁of▁sentence｜>",
})

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the regexes applied in turn (each splits the pieces of the previous).
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt2", "gpt-2", "default", "mpt", "olmo", "jais", "phi-2", "roberta-bpe"), (_GPT2_WORDS,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2_WORDS)
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3_WORDS,)
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2_WORDS,)),
}


@dataclass(frozen=True)
class GGUFVocab:
    """What a checkpoint directory's tokenizer files would hold, rebuilt from GGUF metadata."""

    tokenizer: tokenizers.Tokenizer
    # tokenizer_config.json's equivalent: bos/eos/unk/pad token texts, chat_template.
    config: dict[str, Any] = field(default_factory=dict)
    # generation_config.json's equivalent: every end-of-generation id.
    generation_config: dict[str, Any] = field(default_factory=dict)


def end_of_generation_ids(metadata: dict[str, Any]) -> set[int]:
    """eos, end-of-turn and end-of-message ids, plus control tokens that end a chat turn."""
    ids = {
        int(metadata[key])
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if metadata.get(key) is not None
    }
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    for token_id, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED) and text in _END_OF_TURN_TEXTS:
            ids.add(token_id)
    return ids


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id; a text listed twice keeps its first id (a few vocabularies repeat one)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _byte_level_bpe(path: str, metadata: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    splits = _PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise ValueError(
            f"{path}: unsupported metadata tokenizer.ggml.pre={pre!r} (unknown pre-tokenizer); supported: "
            f"{', '.join(sorted(_PRE_TOKENIZER_SPLITS))}."
        )
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    tok = tokenizers.Tokenizer(models.BPE(
        _first_ids(tokens), merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    ))
    if splits == (_GPT2_WORDS,):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's rule: of all adjacent pairs, merge the one
    whose result has the highest score. Within a score, longer left then longer right
    pieces go first, and then token order (the order transformers derives them in)."""
    vocab = _first_ids(tokens)
    candidates = []  # (score, len left, len right, order, left, right)
    for token_id, token in enumerate(tokens):
        if types[token_id] not in (NORMAL, USER_DEFINED) or vocab[token] != token_id:
            continue
        local = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        for _, _, left, right in sorted(local):
            candidates.append((-scores[token_id], -len(left), -len(right), len(candidates), left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = tokenizers.Tokenizer(models.BPE(
        _first_ids(tokens), _spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True,
        dropout=None,
    ))
    prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def vocab_from_gguf(path: str, metadata: dict[str, Any]) -> GGUFVocab:
    """Build the tokenizer and its side settings from a GGUF file's metadata.

    Raises:
        ValueError: no vocabulary, or a tokenizer model / pre-tokenizer we do not know.
    """
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: no tokenizer in the file (metadata key 'tokenizer.ggml.tokens' is missing).")
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_bpe(path, metadata, tokens)
        default_add_bos = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(metadata, tokens)
        default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ValueError(
            f"{path}: unsupported metadata tokenizer.ggml.model={kind!r}; tokenmill reads 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece) vocabularies."
        )

    # Special and user-defined tokens are matched whole in the text before any splitting.
    types = metadata.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token_text(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = token_text("bos_token_id"), token_text("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = {bos: metadata["tokenizer.ggml.bos_token_id"]} if add_bos else {}
        if add_eos:
            specials[eos] = metadata["tokenizer.ggml.eos_token_id"]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))

    config = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_text("unknown_token_id"),
        "pad_token": token_text("padding_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    return GGUFVocab(tok, config, {"eos_token_id": sorted(end_of_generation_ids(metadata))})
