"""Tiny real tokenizers built in a few milliseconds, saved as HF checkpoint directories.

Shared by the tokenizer and detokenizer tests. CJK text and emoji are deliberately absent
from the training corpus, so they are split into several byte tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I am fine, thank you.",
    "tokenmill serves tokens fast, and the tokens stream to the user.",
    "STOP here. The end is near; the end is here.",
] * 4

METASPACE = "\u2581"

# A simple template of our own: no special tokens, exercises loops and the generation prompt.
SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Llama-3-style: BOS text from the template, header tokens, trimmed content, eot after each turn.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ChatML (Qwen-style): no BOS, default system prompt, tools rendered with tojson.
CHATML_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- 'Tools:\\n' }}
{%- for tool in tools %}
{{- tool | tojson }}
{{- '\\n' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (tools and loop.first and message.role == 'system') %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _write(directory: Path, tok: Tokenizer, config: dict[str, Any], generation_config: dict[str, Any] | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def build_byte_level(
    directory: Path,
    special_tokens: list[str],
    bos: str | None = None,
    config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """GPT-2/Qwen/Llama-3 style byte-level BPE; `bos` set: its post-processor prepends it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _write(directory, tok, config or {}, generation_config)


def build_sentencepiece_like(
    directory: Path,
    use_metaspace_pre_tokenizer: bool = True,
    config: dict[str, Any] | None = None,
) -> Path:
    """Llama-2 style BPE: '▁' word marker, <0xXX> byte fallback, <s> prepended, Strip decoder.

    use_metaspace_pre_tokenizer picks the newer tokenizer.json layout (Metaspace
    pre-tokenizer) over the older one (Prepend + Replace normalizer).
    """
    # Learn merges on '▁'-marked text, then rebuild the model with Llama's id layout:
    # <unk>, <s>, </s>, the 256 byte tokens, then the learned pieces.
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend(METASPACE), normalizers.Replace(" ", METASPACE)])
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=250, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if use_metaspace_pre_tokenizer:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(METASPACE), normalizers.Replace(" ", METASPACE)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    base = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    return _write(directory, tok, {**base, **(config or {})}, None)


def build_llama3_like(directory: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return build_byte_level(
        directory,
        specials,
        bos="<|begin_of_text|>",
        config={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3_TEMPLATE,
            "model_max_length": 131072,
        },
        generation_config={"bos_token_id": 0, "eos_token_id": [1, 4]},
    )


def build_qwen_like(directory: Path) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return build_byte_level(
        directory,
        specials,
        config={
            "bos_token": None,
            "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": 1e30,
        },
        generation_config={"eos_token_id": [2, 0], "pad_token_id": 0},
    )
