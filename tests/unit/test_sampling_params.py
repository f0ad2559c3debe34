"""SamplingParams: validation names the parameter, normalisation, n>1 children."""

from __future__ import annotations

import pytest

from tokenmill.sampling_params import SamplingParams

INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", float("nan")),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("max_tokens", -1),
    ("min_tokens", -1),
    ("seed", "42"),
    ("logprobs", -1),
    ("prompt_logprobs", -1),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
]


@pytest.mark.parametrize("param, value", INVALID)
def test_invalid_values_raise_naming_the_param(param, value):
    with pytest.raises(ValueError, match=f"^{param} ") as info:
        SamplingParams(**{param: value})
    assert info.value.param == param  # the server puts this in the 400's `param`


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="^min_tokens .*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.skip_special_tokens
    assert not p.is_greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(top_k=-1).top_k == 0


def test_greedy_drops_truncation_settings():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_children_of_a_seeded_request_get_seed_plus_index():
    parent = SamplingParams(n=3, seed=10, stop=["x"], stop_token_ids=[7])
    parent.all_stop_token_ids = {2, 7}
    children = [parent.clone_for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 for c in children)
    assert parent.n == 3 and parent.seed == 10
    # Children own their lists: the engine may edit one without touching the others.
    children[0].stop.append("y")
    children[0].stop_token_ids.append(8)
    children[0].all_stop_token_ids.add(8)
    assert parent.stop == ["x"] and parent.stop_token_ids == [7] and parent.all_stop_token_ids == {2, 7}
    assert children[1].stop == ["x"] and children[1].all_stop_token_ids == {2, 7}


def test_children_of_an_unseeded_request_stay_unseeded():
    parent = SamplingParams(n=2)
    assert [parent.clone_for_child(i).seed for i in range(2)] == [None, None]
