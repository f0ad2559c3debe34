"""Structured output's cost: decode speed with a JSON schema vs without (the masks computed
at the start of each step, and on a thread beside the forward pass), a schema's first
compile vs a cached one, and one step's token masks for 64 rows (docs/structured_output.md,
"Speed").

    python scripts/bench_structured.py [--model PATH] [--streams 1,64] [--rounds 3]

One engine, the two workloads alternated for --rounds rounds, medians printed. Every
request decodes --max-tokens tokens (ignore_eos, and a schema no output can complete in
that many), so the ratio is the constraint's per-step cost, not shorter outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.structured import StructuredOutputsParams
from tokenmill.structured.mask import TokenMaskWorker, apply_token_masks

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 100},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Checkpoint (default: the default model).")
    parser.add_argument("--streams", default="1,64", help="Concurrent requests per run, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    llm = LLM(model=args.model, max_model_len=512)
    for n in (int(v) for v in args.streams.split(",")):
        prompts = [f"Describe person number {i} as JSON." for i in range(n)]
        common = dict(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True)
        schema = SamplingParams(**common, structured_outputs={"json": SCHEMA})
        vocab = llm.config.model.vocab_size
        workloads = {"free": (SamplingParams(**common), TokenMaskWorker(vocab)),
                     "json schema": (schema, TokenMaskWorker(vocab)),  # as served: masks beside the forward pass
                     "json schema, masks computed first": (schema, TokenMaskWorker(vocab, overlap=False))}
        llm.generate(prompts[:2], schema, use_tqdm=False)  # warm-up, compiles the schema
        rates: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(args.rounds):
            for name, (params, masks) in workloads.items():
                llm.engine.runner.token_masks = masks
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                rates[name].append(tokens / (time.perf_counter() - start))
        free = statistics.median(rates["free"])
        print(f"{n} streams: " + ", ".join(
            f"{name} {statistics.median(r):.1f} tok/s ({statistics.median(r) / free:.2f})" for name, r in rates.items()))

    wide = dict(SCHEMA, properties={**SCHEMA["properties"], "extra": {
        "type": "object", "properties": {f"f{i}": {"type": "number"} for i in range(20)}}})
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=wide))
    times = []
    for _ in range(2):  # what a request costs the front end: a compile, then a copy of the cached one
        start = time.perf_counter()
        llm.processor.grammar(params).deep_copy()
        times.append(time.perf_counter() - start)
    print(f"a new schema: first request {times[0] * 1e3:.2f} ms to compile, then {times[1] * 1e6:.0f} us (cached)")

    # One step's masks for 64 constrained rows (each matcher a few tokens into its output).
    matchers = [llm.processor.grammar(params).deep_copy() for _ in range(64)]
    prefix = llm.tokenizer.encode('{"name":"Ann', add_special_tokens=False)
    for m in matchers:
        m.consume_tokens(prefix)
    logits = torch.zeros(64, llm.config.model.vocab_size)
    worker = TokenMaskWorker(llm.config.model.vocab_size)  # as served
    worker.start(matchers).result()  # starts its threads
    start = time.perf_counter()
    for _ in range(20):
        masks = worker.start(matchers).result()
    computed = time.perf_counter()
    for _ in range(20):
        apply_token_masks(logits, masks)
    applied = time.perf_counter()
    print(f"token masks of 64 rows: {(computed - start) / 20 * 1e3:.2f} ms to compute (as served), "
          f"{(applied - computed) / 20 * 1e3:.2f} ms to apply, per step")


if __name__ == "__main__":
    main()
