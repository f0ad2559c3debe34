"""IncrementalDetokenizer: split characters, sentencepiece spaces, stop strings, streaming."""

from __future__ import annotations

import pytest
from tokenizer_factory import build_byte_level, build_sentencepiece_like

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MIXED = "Hello 你好，世界 😀🎉 the end, ünï 👩‍👩‍👧 ok"


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory):
    d = build_byte_level(tmp_path_factory.mktemp("bl"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    return Tokenizer.from_dir(build_sentencepiece_like(tmp_path_factory.mktemp("sp")))


def _split(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int], str]:
    """Encode prompt+completion once and cut the ids where the prompt's text ends (the
    first token that starts after it); return prompt ids, output ids and the output's text
    as it reads after the prompt (sentencepiece's leading space included)."""
    all_ids = tok.encode(prompt + completion)
    cut = next(
        i for i in range(1, len(all_ids))
        if len(tok.decode(all_ids[:i])) >= len(prompt) and not tok.decode(all_ids[:i]).endswith(REPLACEMENT)
    )
    prompt_ids, output_ids = all_ids[:cut], all_ids[cut:]
    expected = tok.decode(all_ids)[len(tok.decode(prompt_ids)):]
    return prompt_ids, output_ids, expected


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> tuple[list[str], str | None]:
    """Feed ids `chunk` at a time like the engine; return the deltas and the stop that fired."""
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        stop = detok.update(ids[i:i + chunk])
        deltas.append(detok.get_delta_text(finished=stop is not None))
        if stop is not None:
            return deltas, stop
    deltas.append(detok.get_delta_text(finished=True))
    return deltas, None


@pytest.mark.parametrize("tok_name", ["bytelevel", "sentencepiece"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_split_characters_never_emit_replacement_chars(request, tok_name, chunk):
    tok = request.getfixturevalue(tok_name)
    prompt_ids, output_ids, expected = _split(tok, "The answer:", MIXED)
    # The CJK and emoji really are split across tokens (they are not in the training text).
    assert any(REPLACEMENT in tok.decode([t]) for t in output_ids)
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    deltas, stop = _stream(detok, output_ids, chunk)
    assert stop is None
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == expected
    assert detok.token_ids == output_ids


def test_text_matches_plain_decode_for_byte_level(bytelevel):
    output_ids = bytelevel.encode(MIXED)
    detok = IncrementalDetokenizer(bytelevel, bytelevel.encode("x"), SamplingParams())
    deltas, _ = _stream(detok, output_ids)
    assert "".join(deltas) == bytelevel.decode(output_ids) == MIXED


def test_sentencepiece_leading_space_uses_prompt_context(sentencepiece):
    all_ids = sentencepiece.encode("Hello there, how are you")
    # Cut before a word-start piece ("▁how"): decoded alone it loses its space.
    cut = next(i for i in range(2, len(all_ids)) if sentencepiece.backend.id_to_token(all_ids[i]).startswith("\u2581"))
    prompt_ids, output_ids = all_ids[:cut], all_ids[cut:]
    expected = sentencepiece.decode(all_ids)[len(sentencepiece.decode(prompt_ids)):]
    assert expected.startswith(" ") and not sentencepiece.decode(output_ids).startswith(" ")
    detok = IncrementalDetokenizer(sentencepiece, prompt_ids, SamplingParams())
    assert "".join(_stream(detok, output_ids)[0]) == expected

    # Without a prompt there is no context, and the text is what decode() gives.
    no_prompt = IncrementalDetokenizer(sentencepiece, [], SamplingParams())
    ids = sentencepiece.encode("Hello world", add_special_tokens=False)
    assert "".join(_stream(no_prompt, ids)[0]) == "Hello world"


def test_long_prompt_uses_only_its_tail(sentencepiece):
    prompt = "the quick brown fox jumps over the lazy dog. " * 20 + "你好"
    prompt_ids, output_ids, expected = _split(sentencepiece, prompt, " world 😀 end")
    detok = IncrementalDetokenizer(sentencepiece, prompt_ids, SamplingParams())
    assert "".join(_stream(detok, output_ids)[0]) == expected


@pytest.mark.parametrize("tok_name", ["bytelevel", "sentencepiece"])
def test_every_prompt_cut_point(request, tok_name):
    """Wherever the prompt ends, even inside a character, the output text is everything
    after the prompt's complete characters, and no delta holds U+FFFD."""
    tok = request.getfixturevalue(tok_name)
    all_ids = tok.encode("the lazy dog. " + MIXED)
    full_text = tok.decode(all_ids)
    for cut in range(1, len(all_ids)):
        prompt_ids = all_ids[:cut]
        # Byte fallback turns a whole unfinished byte run into U+FFFDs, so find the text
        # of the longest prefix that ends on a complete character.
        complete_prompt = next(
            text for j in range(cut, -1, -1) if not (text := tok.decode(all_ids[:j])).endswith(REPLACEMENT)
        )
        detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
        deltas, _ = _stream(detok, all_ids[cut:])
        assert all(REPLACEMENT not in d for d in deltas), cut
        assert "".join(deltas) == full_text[len(complete_prompt):], cut


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(bytelevel, skip):
    im_end = bytelevel.token_to_id("<|im_end|>")
    output_ids = bytelevel.encode("Hi there") + [im_end] + bytelevel.encode(" more")
    detok = IncrementalDetokenizer(bytelevel, [1], SamplingParams(skip_special_tokens=skip))
    text = "".join(_stream(detok, output_ids)[0])
    assert text == ("Hi there more" if skip else "Hi there<|im_end|> more")
    assert text == bytelevel.decode(output_ids, skip_special_tokens=skip)


# ---- stop strings ----------------------------------------------------------------------------


def _first_index_completing(tok: Tokenizer, ids: list[int], stop: str) -> int:
    return next(i for i in range(len(ids)) if stop in tok.decode(ids[: i + 1]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(bytelevel, include):
    text = "Hello there! How are you today? I am fine."
    ids = bytelevel.encode(text)
    stop = "re! Ho"
    stop_at = _first_index_completing(bytelevel, ids, stop)
    assert bytelevel.decode(ids[stop_at:stop_at + 1]) != stop  # it does span tokens
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=[stop], include_stop_str_in_output=include))
    fired_at, fired = next((i, s) for i, t in enumerate(ids) if (s := detok.update([t])) is not None)
    assert (fired_at, fired) == (stop_at, stop)
    assert detok.output_text == ("Hello there! Ho" if include else "Hello the")
    assert detok.stop_str == stop
    assert detok.update(ids[fired_at + 1:]) is None  # finished: later tokens change nothing
    assert detok.output_text == ("Hello there! Ho" if include else "Hello the")


def test_stop_found_inside_a_multi_token_update_cuts_the_rest(bytelevel):
    ids = bytelevel.encode("Hello there! How are you today?")
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop="How"))
    assert detok.update(ids) == "How"
    assert detok.output_text == "Hello there! "


def test_stop_at_the_first_token(bytelevel):
    ids = bytelevel.encode("Hello world")
    first = bytelevel.decode(ids[:1])
    detok = IncrementalDetokenizer(bytelevel, [5], SamplingParams(stop=[first]))
    assert detok.update(ids[:1]) == first
    assert detok.output_text == "" and detok.get_delta_text(finished=True) == ""


def test_earliest_completed_stop_wins(bytelevel):
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["you today", "How are"]))
    assert detok.update(bytelevel.encode("Hello there! How are you today?")) == "How are"
    assert detok.output_text == "Hello there! "


def test_stop_strings_with_split_characters(bytelevel):
    ids = bytelevel.encode("ok 你好世界 done")
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["好世"]))
    deltas, stop = _stream(detok, ids)
    assert stop == "好世" and "".join(deltas) == detok.output_text == "ok 你"


def test_streaming_holds_back_a_possible_stop_prefix(bytelevel):
    text = "the end is near; the end is here."
    ids = bytelevel.encode(text)
    stop = "is here"
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=[stop, "xx"]))
    sent = ""
    for t in ids:
        fired = detok.update([t])
        delta = detok.get_delta_text(finished=fired is not None)
        sent += delta
        if fired is None:
            # Everything but the last len("is here") - 1 characters is out.
            assert sent == detok.output_text[: max(0, len(detok.output_text) - (len(stop) - 1))]
        else:
            break
    assert fired == stop
    assert sent == detok.output_text == "the end is near; the end "


def test_streaming_without_stop_strings_or_with_include_holds_nothing(bytelevel):
    ids = bytelevel.encode("the end is near")
    for params in (SamplingParams(), SamplingParams(stop=["zzzz"], include_stop_str_in_output=True)):
        detok = IncrementalDetokenizer(bytelevel, [], params)
        for t in ids:
            detok.update([t])
            detok.get_delta_text(finished=False)
            assert detok._num_sent_chars == len(detok.output_text)


def test_finished_releases_held_back_text(bytelevel):
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["never appears"]))
    detok.update(bytelevel.encode("the end"))
    assert detok.get_delta_text(finished=False) == ""
    assert detok.get_delta_text(finished=True) == "the end"
    assert detok.get_delta_text(finished=True) == ""


def test_decode_token(sentencepiece, bytelevel):
    detok = IncrementalDetokenizer(sentencepiece, [], SamplingParams())
    ids = sentencepiece.encode("Hello world, how are you", add_special_tokens=False)
    word_starts = [t for t in ids if sentencepiece.backend.id_to_token(t).startswith("\u2581")]
    assert len(word_starts) >= 2
    assert all(detok.decode_token(t).startswith(" ") for t in word_starts)
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams())
    assert detok.decode_token(bytelevel.token_to_id("<|im_end|>")) == "<|im_end|>"


def test_stop_string_ignored_below_min_tokens():
    from tokenmill.engine.detokenizer import IncrementalDetokenizer
    from tokenmill.sampling_params import SamplingParams

    tok = _min_tokens_tokenizer()
    ids = tok.encode("ab ab ab ab", add_special_tokens=False)
    params = SamplingParams(stop=["ab"], min_tokens=len(ids) - 1, max_tokens=50)
    detok = IncrementalDetokenizer(tok, [], params)
    stops = [detok.update([t]) for t in ids]
    # Every "ab" before min_tokens tokens exist is ignored; the last one stops.
    assert stops[:-1] == [None] * (len(ids) - 1)
    assert stops[-1] == "ab"
    assert detok.output_text == tok.decode(ids[:-1]) + " "  # the last token is " ab"


def _min_tokens_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from tokenmill.tokenizer import Tokenizer

    vocab = {"ab": 0, "Ġ": 1, "Ġab": 2, "a": 3, "b": 4}
    backend = HFTokenizer(models.BPE(vocab, [("a", "b"), ("Ġ", "ab")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)
