"""Tokenizer: a checkpoint's tokenizer, special tokens and chat template.

Wraps `tokenizers.Tokenizer` (the Rust library, no transformers at run time) and reads the
side files a checkpoint directory carries, or the metadata of a GGUF file. Encoding follows
`tokenizer.json` exactly, which is what transformers 5 does too: its post-processor alone
decides whether BOS is added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from tokenmill.chat_template import pick_chat_template, render_chat_template

# transformers uses a huge sentinel (1e30) for "no limit"; anything this large means none.
_NO_MAX_LENGTH = 10**12

# sentencepiece's word-start marker: a token beginning with it starts with a space.
_METASPACE = "\u2581"


def _token_content(value: Any) -> str | None:
    """A special token from a config file: a plain string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path.name} not found in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its special tokens and chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Build from an already loaded `tokenizers.Tokenizer` and the parsed side files.

        Args:
            tokenizer: the Rust tokenizer (from tokenizer.json).
            config: tokenizer_config.json's contents, if any.
            generation_config: generation_config.json's contents, if any.
            chat_template: overrides the config's chat_template when given.
        """
        config = config or {}
        generation_config = generation_config or {}
        self._tok = tokenizer
        # Logprobs ask for the same few thousand tokens' text over and over.
        self._token_text_cache: dict[int, str] = {}
        self._add_missing_tokens(config.get("added_tokens_decoder") or {})

        # The token texts come from tokenizer_config only: they are also chat template
        # variables, which transformers leaves undefined when the config has none.
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.pad_token = _token_content(config.get("pad_token"))

        bos_id = self._id_or_none(self.bos_token)
        if bos_id is None and isinstance(generation_config.get("bos_token_id"), int):
            bos_id = generation_config["bos_token_id"]
        self._bos_token_id = bos_id

        gen_eos = generation_config.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos_id = self._id_or_none(self.eos_token)
        if eos_id is None and gen_eos_ids:
            eos_id = gen_eos_ids[0]
        self._eos_token_id = eos_id
        self._eos_token_ids = set(gen_eos_ids) | ({eos_id} if eos_id is not None else set())

        self._chat_template = chat_template or pick_chat_template(config.get("chat_template"))
        max_len = config.get("model_max_length")
        self.model_max_length: int | None = (
            int(max_len) if isinstance(max_len, (int, float)) and max_len < _NO_MAX_LENGTH else None
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face checkpoint directory's tokenizer.

        Args:
            path: directory holding tokenizer.json (required), and optionally
                tokenizer_config.json, generation_config.json, chat_template.jinja.

        Returns:
            The Tokenizer.

        Raises:
            FileNotFoundError: tokenizer.json is missing.
            ValueError: a file is corrupt.
        """
        root = Path(path)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {root}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tok_path} could not be loaded: {e}") from e
        config = _read_json(root / "tokenizer_config.json", required=False)
        generation_config = _read_json(root / "generation_config.json", required=False)
        # Newer transformers save the template beside the config; it wins, as it does there.
        template_path = root / "chat_template.jinja"
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        return cls(tok, config, generation_config, template)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its metadata (vocabulary, merges,
        special tokens, add_bos, chat template), as its tokenizer files would have it.

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: the file has no tokenizer, or one of a kind tokenmill cannot rebuild.
        """
        from tokenmill.model.gguf.reader import GGUFFile
        from tokenmill.model.gguf.vocab import vocab_from_gguf

        vocab = vocab_from_gguf(str(path), GGUFFile(path).metadata)
        return cls(vocab.tokenizer, vocab.config, vocab.generation_config)

    @classmethod
    def load(cls, model: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint: a Hugging Face directory or a GGUF file."""
        from tokenmill.model.gguf import is_gguf_file

        return cls.from_gguf(model) if is_gguf_file(model) else cls.from_dir(model)

    # ---- special tokens -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence id (the tokenizer's own)."""
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the tokenizer's eos and generation_config's."""
        return set(self._eos_token_ids)

    @property
    def all_special_ids(self) -> list[int]:
        """Named special tokens (bos/eos/unk/pad) and added tokens flagged special, sorted."""
        ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            token_id = self._id_or_none(token)
            if token_id is not None:
                ids.add(token_id)
        ids |= self._eos_token_ids
        return sorted(ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def adds_bos_token(self) -> bool:
        """Whether encode(add_special_tokens=True) puts the BOS token first."""
        if self._bos_token_id is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self._bos_token_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for incremental decoding)."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize text.

        Args:
            text: the text.
            add_special_tokens: apply tokenizer.json's post-processor (e.g. prepend BOS).

        Returns:
            Token ids, the same as transformers' `tokenizer(text)["input_ids"]`.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Detokenize ids (no clean_up_tokenization_spaces, so streaming text matches)."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprobs: keeps sentencepiece's leading space, which
        decoding a lone token would strip."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            piece = self._tok.id_to_token(token_id) or ""
            if piece.startswith(_METASPACE) and not text.startswith(" "):
                text = " " + text
            self._token_text_cache[token_id] = text
        return text

    # ---- chat -----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text the way transformers does.

        Args:
            messages: [{"role": ..., "content": str | [{"type": "text", "text": ...}]}, ...].
            add_generation_prompt: append the assistant turn header.
            chat_template: use this template instead of the checkpoint's.
            **extra: more template variables (tools, documents, enable_thinking, ...).

        Returns:
            The rendered prompt text (it usually already holds the BOS token's text).

        Raises:
            ValueError: there is no chat template, or a message cannot be rendered.
        """
        source = chat_template or self._chat_template
        if source is None:
            raise ValueError(
                "This model has no chat template (none in tokenizer_config.json or "
                "chat_template.jinja), so chat messages cannot be formatted; use a completion prompt."
            )
        if not messages:
            raise ValueError("messages must not be empty.")
        variables: dict[str, Any] = {"tools": None, "documents": None}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, name) is not None:
                variables[name] = getattr(self, name)
        variables.update(extra)
        return render_chat_template(source, messages, add_generation_prompt, variables)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Render and tokenize a conversation as transformers' apply_chat_template(tokenize=True).

        The template writes the special tokens itself, so none are added here (no double BOS).

        Returns:
            The prompt's token ids.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    # ---- internals ------------------------------------------------------------------------

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _add_missing_tokens(self, added_tokens_decoder: dict[str, Any]) -> None:
        """Add tokens that tokenizer_config declares but tokenizer.json lacks (as transformers)."""
        missing = []
        for spec in added_tokens_decoder.values():
            content = _token_content(spec)
            if content is None or self._tok.token_to_id(content) is not None:
                continue
            missing.append(tokenizers.AddedToken(
                content,
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False))),
                special=bool(spec.get("special", False)),
            ))
        if missing:
            self._tok.add_tokens(missing)
