"""`tokenmill eval` on the bundled demo model, through the CLI: PPL against transformers'
perplexity computed here on the same text and protocol, KL divergence of a run against
itself and of bfloat16 against float32, the stored distributions' error on real rows, and
the verdicts (bf16 and a perturbed model flagged, an identical run passed), and the server
path over real loopback HTTP against a real `tokenmill serve`.

Short windows and few of them keep this to seconds: 4 windows of 128 tokens.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from tokenmill.bench.quality.distributions import STEP_NATS, LogitsFile, kl_against_full
from tokenmill.bench.quality.local import score_with_engine
from tokenmill.bench.quality.protocol import Protocol, windows_for_text
from tokenmill.bench.quality.scoring import Accumulator
from tokenmill.cli import main
from tokenmill.config import DEMO_MODEL_DIR

CTX, CHUNKS = 128, 4
# Public-domain lines, shuffled into a text of ~800 demo-model tokens.
LINES = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "It is the east, and Juliet is the sun.",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "Deny thy father and refuse thy name;",
    "HAMLET: To be, or not to be: that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles,",
    "MACBETH: Tomorrow, and tomorrow, and tomorrow,",
    "Creeps in this petty pace from day to day,",
    "KING RICHARD III: Now is the winter of our discontent",
    "Made glorious summer by this sun of York;",
    "PORTIA: The quality of mercy is not strain'd,",
    "It droppeth as the gentle rain from heaven",
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Text file, history db, and the float32 reference run (run 1) with its saved logits."""
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    text = "\n".join(rng.choice(LINES) for _ in range(130)) + "\n"
    (root / "text.txt").write_text(text)
    env = {"text": str(root / "text.txt"), "db": str(root / "bench.db"), "ref": str(root / "ref"), "root": root}
    assert main(perplexity_args(env, "--dtype", "float32", "--save-logits", env["ref"])) == 0
    return env


def perplexity_args(env: dict, *extra: str) -> list[str]:
    # The demo model explicitly (the default is SmolLM2); a later --model in `extra` wins.
    return ["eval", "perplexity", "--model", DEMO_MODEL_DIR, "--text", env["text"], "-c", str(CTX), "--chunks", str(CHUNKS),
            "--db", env["db"], "--no-progress", "--json", *extra]


def eval_json(capsys, env: dict, *extra: str) -> dict:
    """`tokenmill eval perplexity --json` on the lab's text; returns the stored run."""
    capsys.readouterr()
    assert main(perplexity_args(env, *extra)) == 0
    return json.loads(capsys.readouterr().out)


def transformers_ppl(text: str) -> float:
    """The protocol written out with transformers alone: tokenize the whole text (BOS first),
    windows of CTX with BOS in front, NLL of positions CTX/2 .. CTX-2 predicting the next token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    nll = []
    for c in range(CHUNKS):
        window = torch.tensor([tok.bos_token_id] + ids[c * CTX + 1: (c + 1) * CTX])
        with torch.inference_mode():
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        first = CTX // 2
        nll += (-logp[first: CTX - 1].gather(1, window[first + 1:, None])[:, 0]).tolist()
    assert len(nll) == CHUNKS * (CTX - 1 - CTX // 2)
    return math.exp(sum(nll) / len(nll))


def test_perplexity_matches_transformers_within_0p1_percent(lab, capsys):
    expected = transformers_ppl(open(lab["text"]).read())
    tokenmill_run = eval_json(capsys, lab, "--dtype", "float32")
    hf_run = eval_json(capsys, lab, "--backend", "hf")
    for run in (tokenmill_run, hf_run):
        ppl = run["summary"]["perplexity"]
        assert abs(ppl["ppl"] / expected - 1) < 1e-3, (run["server"], ppl["ppl"], expected)
        assert ppl["num_tokens"] == CHUNKS * 63 and ppl["ppl_se"] > 0
    assert abs(hf_run["summary"]["perplexity"]["ppl"] / expected - 1) < 1e-6  # the same computation
    assert tokenmill_run["workload"]["protocol"]["fingerprint"] == hf_run["workload"]["protocol"]["fingerprint"]


def test_run_against_itself_has_zero_kld_and_full_agreement(lab, capsys):
    run = eval_json(capsys, lab, "--dtype", "float32", "--reference", lab["ref"])
    d = run["summary"]["divergence"]
    assert 0 <= d["mean_kld"] < 1e-7 and d["kld_percentiles"]["max"] < 1e-7  # 16-bit storage: ~6e-9
    assert d["same_top"] == 1.0 and d["num_top_judged"] == CHUNKS * 63
    assert d["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert main(["eval", "compare", "1", str(run["id"]), "--db", lab["db"], "--max-kld", "1e-6",
                 "--min-same-top", "100%"]) == 0


def test_bfloat16_is_flagged_by_kld_not_by_ppl(lab, capsys):
    run = eval_json(capsys, lab, "--dtype", "bfloat16", "--reference", lab["ref"])
    d = run["summary"]["divergence"]
    assert 1e-6 < d["mean_kld"] < 1e-2 and d["kld_percentiles"]["p99"] > d["mean_kld"]
    assert 0.9 < d["same_top"] <= 1.0
    capsys.readouterr()
    assert main(["eval", "compare", "1", str(run["id"]), "--db", lab["db"], "--max-kld", "1e-6"]) == 1
    assert "regression" in capsys.readouterr().out
    assert main(["eval", "compare", "1", str(run["id"]), "--db", lab["db"]]) == 0  # PPL within 1%


def test_a_perturbed_model_is_a_ppl_regression(lab, capsys):
    from safetensors.torch import load_file, save_file

    noisy = lab["root"] / "noisy"
    shutil.copytree(DEMO_MODEL_DIR, noisy)
    weights = load_file(noisy / "model.safetensors")
    weights["model.norm.weight"] *= 0.5  # halves every logit: softmax temperature 2
    save_file(weights, noisy / "model.safetensors", metadata={"format": "pt"})
    run = eval_json(capsys, lab, "--model", str(noisy), "--dtype", "float32")
    assert run["summary"]["perplexity"]["ppl"] > 1.05 * lab_ppl(lab)
    capsys.readouterr()
    assert main(["eval", "compare", "1", str(run["id"]), "--db", lab["db"]]) == 1
    assert main(["eval", "compare", str(run["id"]), "1", "--db", lab["db"]]) == 0  # the other way: better
    assert "improvement" in capsys.readouterr().out


def lab_ppl(lab: dict) -> float:
    from tokenmill.bench.store import Store

    with Store(lab["db"]) as store:
        return store.get_run(1, with_samples=False).summary["perplexity"]["ppl"]


def test_stored_distributions_error_on_real_rows(lab):
    """bf16 vs f32 rows of the engine: KL from the 16-bit file vs KL from the exact rows."""
    from tokenmill import LLM

    rows: dict[str, list[torch.Tensor]] = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(DEMO_MODEL_DIR, dtype=dtype)
        windows = windows_for_text(llm.get_tokenizer(), open(lab["text"]).read(), Protocol(CTX, CHUNKS))

        class Capture(Accumulator):
            def add_full(self, chunk, first_position, logprobs, key=dtype):
                rows.setdefault(key, []).append((chunk, first_position, logprobs.clone()))
                return super().add_full(chunk, first_position, logprobs)

        score_with_engine(llm, windows, Capture(windows), lambda _: None)

    def full(dtype: str) -> torch.Tensor:  # [num_scored, vocab], window order
        first = CTX // 2
        by_chunk = {}
        for chunk, p0, lp in rows[dtype]:
            by_chunk.setdefault(chunk, []).append((p0, lp))
        out = []
        for chunk in range(CHUNKS):
            lp = torch.cat([x for _, x in sorted(by_chunk[chunk], key=lambda t: t[0])])
            p0 = min(p for p, _ in by_chunk[chunk])
            out.append(lp[first - p0: CTX - 1 - p0])
        return torch.cat(out)

    f32, bf16 = full("float32"), full("bfloat16")
    stored = LogitsFile.load(lab["ref"])
    kld, _ = kl_against_full(stored.rows(0, stored.num_positions), bf16)
    p, q = (x.double() - torch.logsumexp(x.double(), -1, keepdim=True) for x in (f32, bf16))
    exact = (p.exp() * (p - q)).sum(-1).numpy()
    # First order in the storage rounding (at most STEP_NATS / 2 per log-prob), plus its
    # second-order term (<= STEP_NATS**2 / 8 per position), which dominates where the two
    # rows nearly agree (KLD ~1e-7).
    bound = STEP_NATS * (p.exp() * (p - q).abs()).sum(-1).numpy() + STEP_NATS**2 / 4
    assert (np.abs(kld - exact) <= bound).all()
    assert abs(kld.mean() / exact.mean() - 1) < 0.01  # the mean KLD is off by well under 1%


def test_server_path_over_loopback_matches_the_local_path(lab, capsys):
    """A real `tokenmill serve` (float32) scored over HTTP: the same PPL as the local run,
    and against the local reference a KLD (over the 20 listed tokens) of ~0."""
    from tokenmill.bench.server_process import tokenmill_server

    serve_args = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "64MiB"]
    with tokenmill_server(DEMO_MODEL_DIR, serve_args, start_timeout_s=600) as base_url:
        run = eval_json(capsys, lab, "--base-url", base_url, "--tokenizer", DEMO_MODEL_DIR,
                        "--reference", lab["ref"], "--logprobs", "20")
    local = lab_ppl(lab)
    assert run["server"]["name"] == "tokenmill" and run["server"]["config"]
    assert run["summary"]["backend"] == "server"
    assert abs(run["summary"]["perplexity"]["ppl"] / local - 1) < 1e-5
    d = run["summary"]["divergence"]
    assert 0 <= d["mean_kld"] < 1e-6 and d["same_top"] == 1.0 and d["num_top_judged"] > 0.9 * CHUNKS * 63
    assert main(["eval", "compare", "1", str(run["id"]), "--db", lab["db"], "--max-kld", "1e-5"]) == 0
