"""Incremental detokenization and stop strings for one generated sequence.

Built on `tokenizers.decoders.DecodeStream`, which keeps a few tokens of context so each
step decodes O(new tokens): it holds back a UTF-8 character split across tokens until it
completes, and gets sentencepiece's leading space right because the previous tokens are
part of what it decodes. We prime it with the prompt's last tokens so the first output
token is decoded in context too ("Hi" + "▁there" -> " there", not "there").
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

# Prompt tokens used as decoding context: enough for any decoder's look-behind, and
# extended (up to the max) until the tail does not start inside a UTF-8 character.
_MIN_PROMPT_CONTEXT_TOKENS = 4
_MAX_PROMPT_CONTEXT_TOKENS = 24

# Older tokenizers' DecodeStream raises this when new text does not extend the text
# decoded before it (e.g. a character split between prompt and output); 0.23 does not.
_INVALID_PREFIX_ERROR = "Invalid prefix"

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's sampled token ids into text, watching for stop strings.

    Owns the sequence's output text; the front end calls update() with each step's new
    tokens and get_delta_text() for what to stream.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Args:
            tokenizer: the model's tokenizer.
            prompt_token_ids: the prompt, whose tail is decoding context for the output.
            params: stop strings, include_stop_str_in_output and skip_special_tokens.
        """
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.token_ids: list[int] = []
        self.output_text = ""
        # The stop string that ended the sequence; set once, the text is final after it.
        self.stop_str: str | None = None
        self._max_stop_chars = max((len(s) for s in self.stop), default=0)
        # Streamed text must never be taken back, so while a stop string could still be
        # completing at the end, its possible first len-1 characters are not sent. When
        # the stop string stays in the output nothing before it is ever cut.
        self._holdback_chars = 0 if self.include_stop_str_in_output else max(self._max_stop_chars - 1, 0)
        self._num_sent_chars = 0
        self._min_tokens_chars = 0  # output text length when min_tokens was last unmet
        self._stream = self._new_stream(prompt_token_ids)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append newly sampled tokens and extend the output text.

        Args:
            new_token_ids: the tokens sampled for this sequence since the last call.
            stop_terminated: the engine ended the sequence on its last token (eos or a
                stop token id); that token's text is left out, as vLLM does, unless
                include_stop_str_in_output.

        Returns:
            The stop string that fired (output_text is then cut before it, or after it with
            include_stop_str_in_output), or None.
        """
        if self.stop_str is not None or not new_token_ids:
            return None
        self.token_ids.extend(new_token_ids)
        num_chars_before = len(self.output_text)
        to_decode = new_token_ids
        if stop_terminated and not self.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        pieces = [p for p in (self._step(t) for t in to_decode) if p]
        if not pieces:
            return None
        self.output_text += "".join(pieces)
        if len(self.token_ids) <= self.min_tokens:
            # Text made below min_tokens cannot hold a stop string (as vLLM).
            self._min_tokens_chars = len(self.output_text)
        elif self.stop:
            self._check_stop(num_chars_before)
        return self.stop_str

    def get_delta_text(self, finished: bool) -> str:
        """Text that became final since the last call, for streaming.

        Args:
            finished: the sequence has ended; release everything held back.

        Returns:
            The new text (possibly "").
        """
        end = len(self.output_text)
        if not finished and self.stop_str is None:
            end -= self._holdback_chars
        if end <= self._num_sent_chars:
            return ""
        delta = self.output_text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta

    def decode_token(self, token_id: int) -> str:
        """One token's text, for a logprob entry's decoded_token."""
        return self.tokenizer.decode_token(token_id)

    # ---- internals ------------------------------------------------------------------------

    def _new_stream(self, prompt_token_ids: list[int]) -> DecodeStream:
        """A DecodeStream primed with the prompt's tail as context.

        The tail starts at a character boundary (extended until its text does not start
        with U+FFFD). It is stepped in token by token rather than passed as the newer `ids=`
        prefill: the prefill takes a prompt that ends inside a character as finished text and
        re-emits the whole context once the output completes the character, while stepping
        leaves those bytes pending, so the output starts with the completed character.
        """
        num_prompt = len(prompt_token_ids)
        n = min(_MIN_PROMPT_CONTEXT_TOKENS, num_prompt)
        while n < min(_MAX_PROMPT_CONTEXT_TOKENS, num_prompt):
            if not self._decode(prompt_token_ids[num_prompt - n:]).startswith(_REPLACEMENT_CHAR):
                break
            n += 1
        tail = prompt_token_ids[num_prompt - n:]
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        for token_id in tail:
            self._step(token_id)
        return self._stream

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, token_id: int) -> str | None:
        backend = self.tokenizer.backend
        try:
            return self._stream.step(backend, token_id)
        except Exception as e:  # tokenizers raises a plain Exception
            if _INVALID_PREFIX_ERROR not in str(e):
                raise
            # The context cannot be extended; continue without it (loses at most a
            # leading space or the prompt's half of a character, which is not ours).
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            return self._stream.step(backend, token_id)

    def _check_stop(self, num_chars_before: int) -> None:
        """Find the stop string that completes first in the new text and cut there."""
        text = self.output_text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            # An occurrence must end in the new text; earlier ones were checked before.
            start = text.find(stop, max(self._min_tokens_chars, num_chars_before - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return
        end, start, stop = best
        self.output_text = text[:end] if self.include_stop_str_in_output else text[:start]
        self.stop_str = stop


class NoDetokenizer:
    """IncrementalDetokenizer's interface for engines without a tokenizer
    (skip_tokenizer_init): outputs are token ids only, their text stays empty."""

    output_text = ""

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        return None

    def get_delta_text(self, finished: bool) -> str:
        return ""

    def decode_token(self, token_id: int) -> str | None:
        return None
