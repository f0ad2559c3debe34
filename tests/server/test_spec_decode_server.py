"""A server with speculative decoding, through the official openai client: the same text
as without it (greedy; plain, streamed, n > 1, logprobs), vLLM's spec_decode_* counters in
/metrics, and `--speculative-config` on the command line."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import CEILING_S, MODEL_NAME, ServedProcess, metric, running_server

from tokenmill.config import DEMO_MODEL_DIR

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None}
PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is "
          "the sun. ROMEO: But soft, what light")


@pytest.fixture(scope="module")
def servers():
    with running_server(DEMO_MODEL_DIR) as plain, running_server(DEMO_MODEL_DIR, speculative_config=SPEC) as spec:
        yield plain, spec


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_outputs_match_without_speculation_and_counters_move(servers):
    plain, spec = (_client(s) for s in servers)
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=48, temperature=0, n=2, logprobs=1,
                  extra_body={"ignore_eos": True})
    ref = plain.completions.create(**kwargs)
    out = spec.completions.create(**kwargs)
    assert [c.text for c in out.choices] == [c.text for c in ref.choices]
    assert out.choices[0].logprobs.tokens == ref.choices[0].logprobs.tokens
    assert out.usage.completion_tokens == ref.usage.completion_tokens == 96

    streamed = "".join(chunk.choices[0].text for chunk in spec.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=48, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == ref.choices[0].text

    text = httpx.get(servers[1].url + "/metrics", timeout=CEILING_S).text
    drafts = metric(text, "tokenmill:spec_decode_num_drafts_total")
    proposed = metric(text, "tokenmill:spec_decode_num_draft_tokens_total")
    accepted = metric(text, "tokenmill:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= proposed and drafts > 0
    per_pos = [metric(text, "tokenmill:spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(4)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    assert "spec_decode" not in httpx.get(servers[0].url + "/metrics", timeout=CEILING_S).text


def test_cli_flag_and_bad_config():
    with ServedProcess(DEMO_MODEL_DIR, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                       "--served-model-name", MODEL_NAME) as served:
        out = httpx.post(served.url + "/v1/completions", timeout=CEILING_S,
                         json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
        assert out["usage"]["completion_tokens"] >= 1
        assert httpx.get(served.url + "/version", timeout=CEILING_S).json()
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "tokenmill.server", "--model", DEMO_MODEL_DIR,
                          "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 3}'],
                         capture_output=True, text=True, timeout=CEILING_S)
    assert bad.returncode != 0 and "method must be one of ngram, draft_model" in bad.stderr
