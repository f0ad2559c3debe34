"""Workloads: what prompts a run sends. `random`, `prefix` (shared prefixes), `file`, and for
speculative decoding `grounded` (edit a given passage) and `chat` (open questions); the last
two are built in grounded.py.

Every workload is an endless, seeded iterator of RequestSpec, so a `--num-prompts` run and a
`--duration` run with the same seed send the same first requests. Prompts are made as token
ids and sent as text (decoded with the client tokenizer), as vLLM's random dataset does;
the recorded prompt_len is the re-encoded length, which the server's usage later overrides.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.bench import grounded
from tokenmill.bench.schema import RequestSpec
from tokenmill.bench.tokenizer import TokenizerLike

DATASET_ALIASES = {"prefix_repetition": "prefix", "sharegpt": "file", "custom": "file"}
DATASET_NAMES = ("random", "prefix", "file", "grounded", "chat", *DATASET_ALIASES)


@dataclass(frozen=True)
class WorkloadSpec:
    """The prompts of a run (flag names follow `vllm bench serve`)."""

    dataset_name: str = "random"  # random | prefix | file | grounded | chat (aliases in DATASET_ALIASES)
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    random_prefix_len: int = 0  # one fixed prefix shared by every random prompt
    prefix_num_prefixes: int = 4
    prefix_prefix_len: int = 192
    prefix_suffix_len: int = 64
    prefix_output_len: int = 64
    dataset_path: str | None = None
    file_output_len: int | None = None  # overrides the file's per-prompt output length
    grounded_input_len: int = 256  # token budget of instruction + passage (passages end on whole lines)
    grounded_output_len: int = 128
    grounded_path: str | None = None  # a text file whose paragraphs join the built-in passages
    chat_output_len: int = 128
    prompt_format: str = "text"  # text | token-ids (completions endpoint only)
    seed: int = 0

    def __post_init__(self) -> None:
        name = DATASET_ALIASES.get(self.dataset_name, self.dataset_name)
        object.__setattr__(self, "dataset_name", name)
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset_name!r}; one of {DATASET_NAMES}")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.random_range_ratio}")
        if name == "grounded" and self.grounded_path and not Path(self.grounded_path).is_file():
            raise ValueError(f"--grounded-path {self.grounded_path}: no such file")
        if name == "file" and not self.dataset_path:
            raise ValueError("dataset 'file' needs --dataset-path")
        if self.prompt_format not in ("text", "token-ids"):
            raise ValueError(f"prompt_format must be text or token-ids, got {self.prompt_format}")
        if self.grounded_input_len < grounded.MIN_INPUT_LEN:
            raise ValueError(f"grounded_input_len must be >= {grounded.MIN_INPUT_LEN}, got {self.grounded_input_len}")
        for key in ("random_input_len", "random_output_len", "prefix_num_prefixes",
                    "prefix_suffix_len", "prefix_output_len", "grounded_output_len", "chat_output_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def iter_requests(
    spec: WorkloadSpec, tokenizer: TokenizerLike | None, stream: int = 0
) -> Iterator[RequestSpec]:
    """Endless requests of a workload.

    Args:
        spec: the workload.
        tokenizer: turns token ids into text and measures prompts; every workload but
            file needs one.
        stream: 0 for measured requests; another value gives an independent sequence
            (warm-ups use 1 so that their number does not change the measured prompts).

    Returns:
        An iterator of RequestSpec with index 0, 1, 2, ...
    """
    rng = np.random.default_rng([spec.seed, stream])
    if spec.dataset_name == "file":
        return _file_requests(spec, tokenizer, rng)
    if tokenizer is None:
        raise ValueError(
            f"the {spec.dataset_name} workload needs a tokenizer: pass --tokenizer DIR "
            "(a folder with tokenizer.json matching the served model)"
        )
    if spec.dataset_name == "random":
        return _random_requests(spec, tokenizer, rng)
    if spec.dataset_name == "grounded":
        return _grounded_requests(spec, tokenizer, rng)
    if spec.dataset_name == "chat":
        return _chat_requests(spec, tokenizer, rng)
    return _prefix_requests(spec, tokenizer, rng)


def sampleable_ids(vocab_size: int, avoid_ids: set[int]) -> np.ndarray:
    """Ids 0..vocab_size-1 but avoid_ids: random prompts must not hold BOS/EOS/chat markers,
    a server could stop on them."""
    ids = np.arange(vocab_size, dtype=np.int64)
    return ids[~np.isin(ids, np.fromiter(avoid_ids, dtype=np.int64, count=len(avoid_ids)))]


def sample_length(rng: np.random.Generator, mean_len: int, ratio: float) -> int:
    """A length uniform in [mean_len*(1-ratio), mean_len*(1+ratio)], at least 1."""
    lo = max(1, int(mean_len * (1 - ratio)))
    hi = max(lo, int(mean_len * (1 + ratio)))
    return int(rng.integers(lo, hi + 1))


def _make(index: int, ids: list[int], output_len: int | None, spec: WorkloadSpec,
          tokenizer: TokenizerLike) -> RequestSpec:
    if spec.prompt_format == "token-ids":
        return RequestSpec(index, ids, len(ids), output_len)
    text = tokenizer.decode(ids)
    # Decoding then encoding can merge or split tokens; record what the text really is.
    return RequestSpec(index, text, len(tokenizer.encode(text)), output_len)


def _random_requests(spec: WorkloadSpec, tokenizer: TokenizerLike,
                     rng: np.random.Generator) -> Iterator[RequestSpec]:
    vocab = sampleable_ids(tokenizer.vocab_size, tokenizer.special_ids)
    prefix = rng.choice(vocab, size=spec.random_prefix_len).tolist()
    for index in itertools.count():
        input_len = sample_length(rng, spec.random_input_len, spec.random_range_ratio)
        output_len = sample_length(rng, spec.random_output_len, spec.random_range_ratio)
        ids = prefix + rng.choice(vocab, size=input_len).tolist()
        yield _make(index, ids, output_len, spec, tokenizer)


def _prefix_requests(spec: WorkloadSpec, tokenizer: TokenizerLike,
                     rng: np.random.Generator) -> Iterator[RequestSpec]:
    vocab = sampleable_ids(tokenizer.vocab_size, tokenizer.special_ids)
    prefixes = [rng.choice(vocab, size=spec.prefix_prefix_len).tolist()
                for _ in range(spec.prefix_num_prefixes)]
    for index in itertools.count():
        prefix = prefixes[int(rng.integers(len(prefixes)))]
        ids = prefix + rng.choice(vocab, size=spec.prefix_suffix_len).tolist()
        yield _make(index, ids, spec.prefix_output_len, spec, tokenizer)


def _text_request(index: int, text: str, output_len: int, spec: WorkloadSpec,
                  tokenizer: TokenizerLike) -> RequestSpec:
    ids = tokenizer.encode(text)
    return RequestSpec(index, ids if spec.prompt_format == "token-ids" else text, len(ids), output_len)


def _grounded_requests(spec: WorkloadSpec, tokenizer: TokenizerLike,
                       rng: np.random.Generator) -> Iterator[RequestSpec]:
    documents = list(grounded.package_documents())
    if spec.grounded_path:
        documents.append(grounded.text_document(spec.grounded_path))
    prompts = grounded.grounded_prompts(documents, tokenizer.encode, spec.grounded_input_len, rng)
    for index, prompt in enumerate(prompts):
        yield _text_request(index, prompt.text, spec.grounded_output_len, spec, tokenizer)


def _chat_requests(spec: WorkloadSpec, tokenizer: TokenizerLike,
                   rng: np.random.Generator) -> Iterator[RequestSpec]:
    for index, text in enumerate(grounded.chat_prompts(rng)):
        yield _text_request(index, text, spec.chat_output_len, spec, tokenizer)


def load_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Read a prompt file into records with `prompt` (str or messages) and `output_text`/`output_len`.

    Accepted: JSONL with {"prompt": str} or {"messages": [...]} and optional "output_len" /
    "max_tokens"; ShareGPT (a JSON array, or JSONL, of {"conversations": [{"from", "value"}]}),
    where the first human turn is the prompt and the next reply fixes the output length.

    Args:
        path: the file.

    Returns:
        Records in file order; ShareGPT entries without a human turn are skipped.
    """
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for row in rows:
        if "conversations" in row:
            turns = row["conversations"]
            human = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
            if human is None:
                continue
            reply = turns[human + 1]["value"] if human + 1 < len(turns) else None
            records.append({"prompt": turns[human]["value"], "output_text": reply})
        elif "prompt" in row or "messages" in row:
            out_len = row.get("output_len", row.get("max_tokens"))
            records.append({"prompt": row.get("prompt", row.get("messages")), "output_len": out_len})
        else:
            raise ValueError(f"{path}: a line has neither 'prompt', 'messages' nor 'conversations'")
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records


def _file_requests(spec: WorkloadSpec, tokenizer: TokenizerLike | None,
                   rng: np.random.Generator) -> Iterator[RequestSpec]:
    records = load_prompt_file(spec.dataset_path or "")
    order = rng.permutation(len(records))  # shuffled like vLLM's ShareGPT sampling
    measured: dict[int, tuple[int, int | None]] = {}  # record -> lengths: cycled records are not re-tokenized
    for index in itertools.count():
        i = int(order[index % len(records)])
        if i not in measured:
            measured[i] = _record_lengths(records[i], spec, tokenizer)
        prompt_len, output_len = measured[i]
        yield RequestSpec(index, records[i]["prompt"], prompt_len, output_len)


def _record_lengths(rec: dict[str, Any], spec: WorkloadSpec,
                    tokenizer: TokenizerLike | None) -> tuple[int, int | None]:
    """(prompt tokens, output tokens to ask for) of a prompt-file record; words without a tokenizer."""
    prompt = rec["prompt"]
    flat = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    prompt_len = len(tokenizer.encode(flat)) if tokenizer else len(flat.split())
    output_len = spec.file_output_len or rec.get("output_len")
    if output_len is None and rec.get("output_text"):
        text = rec["output_text"]
        output_len = max(1, len(tokenizer.encode(text)) if tokenizer else len(text.split()))
    return prompt_len, output_len
