"""Tokenizers rebuilt from GGUF metadata: the same ids, text and chat prompts as
transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), on the
real SmolLM2 file and on synthetic files of each vocabulary kind and pre-tokenizer family."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from tokenizer_factory import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    build_byte_level,
    build_sentencepiece_like,
)

from tokenmill.model.default_model import default_model_path
from tokenmill.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    # prose
    "The quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I'm fine, thank you; they'll see. We've DONE it, haven't we?",
    "It was the best of times, it was the worst of times, it was the age of wisdom...",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
    '{"key": [1, 2.5, null], "nested": {"a": true}}',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    # numbers
    "0 1 12 123 1234 12345 123456789 3.14159 -42 1e-9 0x1F 1,000,000 2024-06-01",
    "Call 555-0100 or +1 (800) 123-4567 before 23:59.",
    # whitespace runs
    "   leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\tnewlines\n\n\nand  double  spaces",
    " \n \n\t \r\n",
    "a\u00a0b\u2009c",  # non-breaking and thin spaces
    # unicode
    "naïve café résumé Ångström façade",
    "Москва, Київ, Αθήνα, ירושלים, القاهرة",
    "東京は日本の首都です。你好，世界！한국어 텍스트",
    "mathematics: ∀x ∈ ℝ, x² ≥ 0; ½ + ¼ = ¾",
    "e\u0301 (combining accent) vs é",
    # emoji
    "emoji 😀🚀🤖 and 👩‍👩‍👧 family, flags 🇫🇷🇯🇵",
    "🤗",
    # special tokens inside text
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after end<|im_end|><|im_end|>",
    "not special: <|im_sta rt|> <im_end> <|unknown|>",
    "",
    " ",
    "a",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Write a haiku about GPUs."},
        {"role": "assistant", "content": "Silicon rivers\nflow with warm electric thought"},
        {"role": "user", "content": "Another, with emoji 🚀"},
    ],
]


# ---- the real model ------------------------------------------------------------------------


# Where transformers' GGUF tokenizer and the model's own tokenizer part ways. For
# `tokenizer.ggml.pre = smollm` (and starcoder, refact, ...) llama.cpp, and the tokenizer.json
# SmolLM2 was trained with (Digits(individual_digits) before ByteLevel), split every number
# character off before the GPT-2 regex; transformers' GGUF converter knows no rule for
# `smollm` and uses the GPT-2 regex alone. The two agree on all text except a space followed
# by a non-ASCII number character ("; ½"), where the vocabulary has a merge of the space with
# the character's first UTF-8 byte ("ĠÂ"). tokenmill follows the model's tokenizer and
# llama.cpp; on those texts the test compares with transformers' tokenizer given SmolLM2's
# own pre-tokenizer.
DIGIT_SPLIT_TEXTS = {"mathematics: ∀x ∈ ℝ, x² ≥ 0; ½ + ¼ = ¾"}


def with_digit_split(ref):
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's tokenizer.json."""
    import copy

    from tokenizers import pre_tokenizers

    fixed = copy.deepcopy(ref)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return fixed


@pytest.fixture(scope="session")
def real_tokenizers():
    """(ours, transformers') for SmolLM2-135M-Instruct's GGUF; transformers takes ~10 s.
    Fails (never skips) when the file is not installed."""
    try:
        path = Path(default_model_path())
    except FileNotFoundError as e:
        pytest.fail(f"this test needs the real model file. {e}", pytrace=False)
    ours = Tokenizer.load(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, ref


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_real_ids_match_transformers(real_tokenizers, add_special_tokens):
    ours, ref = real_tokenizers
    fixed = with_digit_split(ref)
    differ = set()
    for text in CORPUS:
        got = ours.encode(text, add_special_tokens=add_special_tokens)
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        if got != expected:
            differ.add(text)
        assert got == fixed(text, add_special_tokens=add_special_tokens)["input_ids"], text
    assert differ == DIGIT_SPLIT_TEXTS  # identical to transformers everywhere else


def test_real_decode_matches_transformers(real_tokenizers):
    ours, ref = real_tokenizers
    for text in CORPUS:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    # Round trip: byte-level BPE loses nothing.
    for text in CORPUS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_real_special_tokens(real_tokenizers):
    ours, ref = real_tokenizers
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert ours.adds_bos_token is False  # tokenizer.ggml.add_bos_token = false in this file
    # Generation ends on the file's eos (<|im_end|>) and on <|endoftext|>, as in llama.cpp.
    assert ours.eos_token_ids == {0, 2}
    assert set(ours.all_special_ids) >= set(ref.all_special_ids)


def test_real_chat_matches_transformers(real_tokenizers):
    ours, ref = real_tokenizers
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == text
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.encode_chat(conv, add_generation_prompt=gen) == list(ids)
    assert ours.apply_chat_template(CONVERSATIONS[0]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# ---- synthetic files: each vocabulary kind and pre-tokenizer family ------------------------


def _write_gguf(path: Path, tokenizer_dir: Path, kind: str, pre: str | None) -> Path:
    """A GGUF carrying the tokenizer of `tokenizer_dir` (tokenizer.json) the way llama.cpp's
    converter writes it, plus the few model keys transformers needs to open it."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model(kind)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if kind == "gpt2":
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    else:
        # SentencePiece: a piece's score is its merge rank (earlier learned = higher score).
        types = [2 if t == "<unk>" else 3 if t in special else 6 if t.startswith("<0x") else 1 for t in tokens]
        w.add_token_types(types)
        w.add_token_scores([0.0 if k != 1 else -float(i) for i, k in enumerate(types)])
        w.add_unk_token_id(vocab["<unk>"])
    for name, key in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        value = cfg.get(name)
        value = value["content"] if isinstance(value, dict) else value
        if value is not None:
            key(vocab[value])
    if "add_bos_token" in cfg:
        w.add_add_bos_token(cfg["add_bos_token"])
    if cfg.get("chat_template"):
        w.add_chat_template(cfg["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SYNTHETIC = {
    # name: (builder, tokenizer.ggml.model, tokenizer.ggml.pre)
    "gpt2": (lambda d: build_byte_level(d, ["<|endoftext|>"], config={"eos_token": "<|endoftext|>"}), "gpt2", "gpt2"),
    "smollm": (lambda d: build_byte_level(
        d, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}),
        "gpt2", "smollm"),
    "llama-bpe": (lambda d: build_byte_level(
        d, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
                "chat_template": LLAMA3_TEMPLATE}), "gpt2", "llama-bpe"),
    "qwen2": (lambda d: build_byte_level(
        d, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        config={"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}), "gpt2", "qwen2"),
    "sentencepiece": (lambda d: build_sentencepiece_like(d), "llama", None),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache: dict[str, tuple[Tokenizer, object, Path]] = {}

    def get(name: str):
        if name not in cache:
            builder, kind, pre = SYNTHETIC[name]
            root = tmp_path_factory.mktemp(name)
            tok_dir = builder(root / "hf")
            path = _write_gguf(root / "model.gguf", tok_dir, kind, pre)
            ref = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file=path.name)
            cache[name] = (Tokenizer.load(path), ref, tok_dir)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_ids_match_transformers(synthetic, name):
    ours, ref, _ = synthetic(name)
    if name == "smollm":
        ref = with_digit_split(ref)  # see DIGIT_SPLIT_TEXTS
    # transformers' GPT2Tokenizer adds its default "<|endoftext|>" as a new id past the end of
    # a vocabulary that lacks it, an id no model has; texts that spell it out are not compared.
    invented = [t for t, i in ref.get_added_vocab().items() if i >= ours.vocab_size]
    assert invented in ([], ["<|endoftext|>"])
    for text in CORPUS:
        if any(t in text for t in invented):
            continue
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece"])
def test_synthetic_ids_match_the_original_tokenizer_json(synthetic, name):
    """Where the file's pre-tokenizer is the one its tokenizer.json used, the rebuilt
    tokenizer is the original one."""
    ours, _, tok_dir = synthetic(name)
    original = Tokenizer.from_dir(tok_dir)
    for text in CORPUS:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text)), text


@pytest.mark.parametrize("name", ["smollm", "llama-bpe", "qwen2"])
def test_synthetic_chat_matches_transformers(synthetic, name):
    ours, ref, _ = synthetic(name)
    for conv in CONVERSATIONS:
        text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(conv) == text
        assert ours.encode_chat(conv) == list(
            ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False))


def test_pre_tokenizer_families_split_as_llama_cpp(synthetic):
    """Each family splits numbers its own way (what its vocabulary was trained on)."""
    expected = {
        "gpt2": ["x", "Ġ12345", "Ġab"],  # GPT-2: a space joins the number, digits stay together
        "smollm": ["x", "Ġ", "1", "2", "3", "4", "5", "Ġab"],  # every digit alone first
        "llama-bpe": ["x", "Ġ", "123", "45", "Ġab"],  # at most three digits
        "qwen2": ["x", "Ġ", "1", "2", "3", "4", "5", "Ġab"],  # one digit each
    }
    for name, pieces in expected.items():
        pre = synthetic(name)[0].backend.pre_tokenizer
        assert [p for p, _ in pre.pre_tokenize_str("x 12345 ab")] == pieces, name
