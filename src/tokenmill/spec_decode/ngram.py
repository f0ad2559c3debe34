"""Prompt lookup: propose what followed the last time the sequence's tail appeared.

Grounded requests (edit, reformat, quote, continue a given text) copy long runs of their
prompt; after the first tokens of such a run, its continuation sits in the prompt.
"""

from __future__ import annotations

from array import array

_ITEM = 4  # bytes per token id in the searched buffer (array "i")


def propose_ngram(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens, trying n = max_n down to min_n (longest match first).

    Args:
        token_ids: the request's prompt and output so far.
    Returns:
        The proposal, [] when no suffix of length >= min_n occurred before.
    """
    if num_tokens < 1:
        return []
    # bytes.rfind runs the search in C; a hit must start on a token boundary.
    haystack = array("i", token_ids).tobytes()
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        needle = haystack[(length - n) * _ITEM:]
        end = (length - 1) * _ITEM  # an earlier occurrence: it may overlap the tail, not be it
        while (at := haystack.rfind(needle, 0, end)) >= 0:
            if at % _ITEM == 0:
                start = at // _ITEM + n
                return token_ids[start:start + num_tokens]
            end = at + len(needle) - 1
    return []
