"""Engine logprobs (token id -> Logprob per position) in OpenAI's two response shapes."""

from __future__ import annotations

from tokenmill.outputs import PositionLogprobs
from tokenmill.server.protocol import ChatLogprob, CompletionLogProbs, TopLogprob
from tokenmill.tokenizer import Tokenizer


def _token_text(tokenizer: Tokenizer, token_id: int, lp: PositionLogprobs | None) -> str:
    entry = lp.get(token_id) if lp else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode_token(token_id)


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: list[int],
    logprobs: list[PositionLogprobs | None],
    num_top: int,
    initial_offset: int = 0,
    out: CompletionLogProbs | None = None,
    text: str | None = None,
) -> CompletionLogProbs:
    """Append tokens to a legacy completions logprobs object.

    Args:
        token_ids: the tokens, one per position (prompt tokens for echo, then output).
        logprobs: the engine's entry for each position; None where there is none (the
            first prompt token, which nothing predicts).
        num_top: the request's `logprobs`: how many alternatives to list per position.
        initial_offset: character offset of the first token in the choice's text.
        out: an object to extend (streaming builds one per chunk, so pass None there).
        text: the echoed prompt text these tokens came from. Special tokens the tokenizer
            added (BOS) are not in it, so they take no width in text_offset.

    Returns:
        `out`, or a new object: tokens, token_logprobs, top_logprobs (the chosen token
        plus the num_top most likely, as vLLM reports them) and text_offset.
    """
    out = out or CompletionLogProbs()
    offset = initial_offset
    special_ids = set(tokenizer.all_special_ids) if text is not None else set()
    for token_id, lp in zip(token_ids, logprobs, strict=False):
        token_text = _token_text(tokenizer, token_id, lp)
        out.tokens.append(token_text)
        out.text_offset.append(offset)
        if not (token_id in special_ids and not text.startswith(token_text, offset)):
            offset += len(token_text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        chosen = lp.get(token_id)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        # Keyed by text, so two tokens with the same text (e.g. partial UTF-8 bytes, both
        # "\ufffd") collide: the chosen token, listed first by the engine, keeps its value.
        top: dict[str, float] = {}
        for tid, entry in lp.items():
            if tid == token_id or (entry.rank is not None and entry.rank <= num_top):
                top.setdefault(_token_text(tokenizer, tid, lp), entry.logprob)
        out.top_logprobs.append(top)
    return out


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], logprobs: list[PositionLogprobs], num_top: int
) -> list[ChatLogprob]:
    """One chat `logprobs.content` entry per generated token.

    Args:
        num_top: the request's `top_logprobs`: the k most likely tokens listed per position.
    """
    entries = []
    for token_id, lp in zip(token_ids, logprobs, strict=False):
        chosen = lp.get(token_id)
        text = _token_text(tokenizer, token_id, lp)
        alternatives = sorted(
            ((tid, e) for tid, e in lp.items() if e.rank is not None and e.rank <= num_top),
            key=lambda x: x[1].rank,
        )
        top = []
        for tid, e in alternatives:
            alt_text = _token_text(tokenizer, tid, lp)
            top.append(TopLogprob(token=alt_text, logprob=e.logprob, bytes=list(alt_text.encode("utf-8"))))
        entries.append(
            ChatLogprob(
                token=text,
                logprob=chosen.logprob if chosen is not None else float("-inf"),
                bytes=list(text.encode("utf-8")),
                top_logprobs=top,
            )
        )
    return entries
