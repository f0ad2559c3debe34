"""OutputProcessor: n>1 aggregation and stop strings in delta (streaming) mode."""

from __future__ import annotations

from test_detokenizer import _min_tokens_tokenizer

from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.sampling_params import SamplingParams

AB, SPACE_AB = 0, 2  # token ids of "ab" and " ab" in the test tokenizer


def test_sample_finished_by_stop_string_reports_once():
    proc = OutputProcessor(_min_tokens_tokenizer(), model_eos_token_ids={4})
    children = proc.add_request("r", None, [3], SamplingParams(n=2, stop=[" ab"], max_tokens=10), delta=True)
    (c0, _, _), (c1, _, _) = children  # (engine id, params, grammar matcher)
    outs, to_abort = proc.process_outputs([EngineCoreOutput(c0, [AB]), EngineCoreOutput(c1, [AB])])
    assert to_abort == []
    outs, to_abort = proc.process_outputs([EngineCoreOutput(c0, [SPACE_AB]), EngineCoreOutput(c1, [AB])])
    assert to_abort == [c0]
    finished = [(o.index, o.finish_reason) for out, _ in outs for o in out.outputs if o.finish_reason]
    assert finished == [(0, "stop")]
    # The core ran one more step before the abort landed: sample 0 must stay silent.
    outs, to_abort = proc.process_outputs([EngineCoreOutput(c0, [AB]), EngineCoreOutput(c1, [AB], finish_reason="length")])
    assert to_abort == []
    assert [(o.index, o.finish_reason) for out, _ in outs for o in out.outputs] == [(1, "length")]
    assert outs[0][0].finished


def test_stop_set_includes_eos_unless_ignored():
    proc = OutputProcessor(_min_tokens_tokenizer(), model_eos_token_ids={4})
    p = SamplingParams(stop_token_ids=[3])
    proc.add_request("a", None, [3], p)
    assert p.all_stop_token_ids == {3, 4}
    q = SamplingParams(stop_token_ids=[3], ignore_eos=True)
    proc.add_request("b", None, [3], q)
    assert q.all_stop_token_ids == {3}
