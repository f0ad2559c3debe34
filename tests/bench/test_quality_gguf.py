"""`tokenmill eval perplexity` on the real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against
transformers' perplexity computed here: the same file dequantized to float32, the same
token windows (tokenmill's tokenizer; its parity with transformers' GGUF tokenizer is
tests/unit/test_tokenizer_gguf.py), the same protocol. Fails (never skips) without the file.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from test_quality_model import LINES

from tests.model.gguf_factory import real_model_path
from tokenmill.cli import main
from tokenmill.tokenizer import Tokenizer

CTX, CHUNKS = 256, 2


def test_real_model_perplexity_matches_transformers(tmp_path, capsys):
    model_path = real_model_path()
    rng = random.Random(1)
    text = "\n".join(rng.choice(LINES) for _ in range(120)) + "\n"
    (tmp_path / "text.txt").write_text(text)
    capsys.readouterr()
    # --quantization none: the file dequantized, as transformers runs it (the native int8
    # path is measured against this one in tests/model/test_native_quantized.py).
    assert main(["eval", "perplexity", "--model", model_path, "--dtype", "float32", "--quantization", "none", "--text",
                 str(tmp_path / "text.txt"), "-c", str(CTX), "--chunks", str(CHUNKS),
                 "--db", str(tmp_path / "bench.db"), "--no-progress", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)

    from transformers import AutoModelForCausalLM

    tok = Tokenizer.load(model_path)
    assert not tok.adds_bos_token  # SmolLM2: windows start with the text's own token
    ids = tok.encode(text)
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    nll = []
    for c in range(CHUNKS):
        window = torch.tensor(ids[c * CTX: (c + 1) * CTX])
        with torch.inference_mode():
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        nll += (-logp[CTX // 2: CTX - 1].gather(1, window[CTX // 2 + 1:, None])[:, 0]).tolist()
    expected = math.exp(sum(nll) / len(nll))
    got = run["summary"]["perplexity"]
    assert got["num_tokens"] == len(nll) == CHUNKS * (CTX - 1 - CTX // 2)
    assert abs(got["ppl"] / expected - 1) < 1e-3, (got["ppl"], expected)
    assert run["model"] == path.stem and run["server"]["config"]["dtype"] == "float32"
