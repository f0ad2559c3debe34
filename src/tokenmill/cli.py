"""`tokenmill` command line: serve, generate, bench, eval, quantize, kernels."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine settings shared by `serve` and `generate` (named as in vLLM)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="A Hugging Face checkpoint directory or a .gguf file (default: SmolLM2-135M-Instruct, "
                        "installed by `make run`).")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Weight and activation dtype. auto: bfloat16 on CPUs with bf16 matrix "
                        "instructions (AVX512-BF16/AMX), float32 otherwise; bf16 on CUDA. (default: auto)")
    g.add_argument("--device", default="cpu", help="Torch device to run on: cpu or cuda. (default: cpu)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="Longest sequence (prompt + output) in tokens. (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=256,
                   help="Most requests running at once in a batch. (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="Token budget of one engine step; longer prompts are prefilled in chunks. (default: 2048)")
    g.add_argument("--block-size", type=int, default=16, help="Tokens per KV cache block. (default: 16)")
    g.add_argument("--kv-cache-memory", type=_parse_bytes, default=None, metavar="BYTES",
                   help="KV cache budget, e.g. 2GiB or 500MB. (default: --kv-cache-memory-fraction of RAM)")
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.25,
                   help="KV cache budget as a fraction of total RAM (CPU) or free GPU memory, used "
                        "when --kv-cache-memory is not given. (default: 0.25)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="Reuse the KV blocks of shared prompt prefixes across requests. (default: on)")
    g.add_argument("--seed", type=int, default=0, help="Seed of the engine's default random generator. (default: 0)")
    g.add_argument("--quantization", default="auto", choices=["auto", "none"],
                   help="How a quantized checkpoint (a GGUF file's Q4/Q5/Q6/Q8 blocks) runs. auto: its weights stay "
                        "as stored and are multiplied natively by the CPU kernels (int8 activations, as llama.cpp; "
                        "memory about the file size); none: dequantize every weight to --dtype at load (the float "
                        "reference). (default: auto)")
    g.add_argument("--speculative-config", type=_parse_json_object, default=None, metavar="JSON",
                   help='Speculative decoding, as vLLM\'s: e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        '(prompt lookup; prompt_lookup_min/max set the matched suffix) or \'{"method": "draft_model", '
                        '"model": "draft.gguf", "num_speculative_tokens": 4}\' (a smaller model with the same '
                        "vocabulary, or a quantized copy of the target). Outputs follow the model's distribution "
                        "exactly; see docs/speculative_decoding.md. (default: off)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly; by default decode steps replay CUDA graphs captured at "
                        "start-up for batch sizes 1, 2, 4, 8, 16, 24, ... up to --max-num-seqs (512 at most).")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="Do not load a tokenizer (for checkpoints without one): prompts must be token ids and "
                        "outputs are token ids; text prompts, chat and stop strings are refused.")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        skip_tokenizer_init=args.skip_tokenizer_init,
        quantization=args.quantization,
        speculative_config=args.speculative_config,
        enforce_eager=args.enforce_eager,
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_bytes(text: str) -> int:
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgib")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; use e.g. 512MiB, 2GiB, 4GB.")
    return int(float(num) * _UNITS[unit])


def _parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    if args.skip_tokenizer_init and args.prompt_token_ids is None:
        raise SystemExit("error: --skip-tokenizer-init needs --prompt-token-ids (there is no tokenizer for text).")
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.gen_seed,
        ignore_eos=args.ignore_eos,
    )
    if args.prompt_token_ids is not None:
        ids = args.prompt_token_ids
        if args.skip_tokenizer_init:  # no text to stream: print the generated ids
            outs = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            print(" ".join(str(t) for t in outs[0].outputs[0].token_ids))
            return 0
        args.prompt, args.chat = llm.get_tokenizer().decode(ids), False
    else:
        tok = llm.get_tokenizer()
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    if not args.chat:
        sys.stdout.write(args.prompt)
    for delta in llm.stream(ids, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    from tokenmill import cpu
    from tokenmill.model import kernels

    how = kernels.mode()
    if how == "0":
        print(f"{kernels.ENV_SWITCH}=0: the CPU kernels are switched off; PyTorch ops run instead.")
        return 0
    if args.kernels_cmd == "build":
        try:
            ops = kernels.cpu_kernels()  # builds if needed, with progress on stderr
        except kernels.KernelBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if ops is None:  # the warning above says why; serving still works, slower
            return 0
    ops = kernels.cpu_kernels()
    print(f"CPU: {cpu.cpu_model()} ({cpu.isa_class()})")
    if ops is None:
        print("CPU kernels: not available (see the warning above); PyTorch ops run instead.")
        return 0
    print(f"library: {kernels.library_path()}")
    print(f"paths this CPU runs: {', '.join(kernels.available_isas())}; in use: {kernels.selected_isa()} "
          f"(set {kernels.ISA_ENV} to choose a narrower one)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from tokenmill.ray.driver import run_ray_server

        return run_ray_server(args)
    from tokenmill.ray.config import ray_flags_given

    if given := ray_flags_given(args):
        print(f"tokenmill serve: {', '.join(given)} only apply with --ray", file=sys.stderr)
        return 2
    from tokenmill.server.api_server import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="LLM inference engine, OpenAI-compatible server and performance lab.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Generate text for one prompt, streamed to the terminal.",
                         description="Generate text for one prompt and stream it to the terminal as it is decoded.")
    gen.add_argument("--prompt", default="The capital of France is",
                     help="Prompt text. (default: 'The capital of France is')")
    gen.add_argument("--prompt-token-ids", type=_parse_ids, default=None, metavar="IDS",
                     help="The prompt as comma-separated token ids instead of text (needed with --skip-tokenizer-init).")
    gen.add_argument("--chat", action="store_true", help="Wrap the prompt as a user message with the model's chat template.")
    gen.add_argument("--max-tokens", type=int, default=64, help="Tokens to generate at most. (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 = greedy. (default: 0.8)")
    gen.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling mass. (default: 0.95)")
    gen.add_argument("--top-k", type=int, default=0, help="Keep only the k most likely tokens; 0 = off. (default: 0)")
    gen.add_argument("--gen-seed", type=int, default=None, help="Seed of this request's sampling, for reproducible output.")
    gen.add_argument("--ignore-eos", action="store_true", help="Keep generating past end-of-sequence tokens.")
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    serve = sub.add_parser("serve", help="Serve a model over the OpenAI-compatible HTTP API.",
                           description="Serve a model over an OpenAI-compatible HTTP API (completions, chat, "
                                       "streaming), with Prometheus metrics at /metrics.")
    from tokenmill.server.args import add_server_args

    add_server_args(serve)
    add_engine_args(serve)
    from tokenmill.ray.config import add_ray_args

    add_ray_args(serve)
    serve.set_defaults(func=_cmd_serve)

    kern = sub.add_parser(
        "kernels", help="Build tokenmill's CPU kernels ahead of time, or show which paths this CPU runs.",
        description="tokenmill's compiled CPU kernels (decode attention, norms, rotary, sampling, products of "
                    "quantized and 16-bit weights) hold a "
                    "generic, an AVX2 and an AVX-512 path in one library, built once per installation with the "
                    "system C++ compiler. `make run` and `make test` run `tokenmill kernels build` first; "
                    "otherwise the first model load builds them. Environment: TOKENMILL_CPU_KERNELS=auto "
                    "(default; fall back to PyTorch ops with a warning) | require (a failed build is an error) | "
                    "0 (off); TOKENMILL_CPU_ISA=generic|avx2|avx512 picks a narrower path; "
                    "TOKENMILL_CPU_KERNELS_BUILD_TIMEOUT (seconds, default 600).")
    kern.add_argument("kernels_cmd", choices=["build", "info"],
                      help="build: build them now if needed (exit 1 on failure with require); "
                           "info: where they are and which instruction-set paths this CPU runs.")
    kern.set_defaults(func=_cmd_kernels)

    bench = sub.add_parser("bench", help="Benchmark any OpenAI-compatible endpoint or the offline engine.",
                           description="The bench lab: load generation, history, regression verdicts, cost, reports.")
    from tokenmill.bench.cli import add_bench_subcommands

    add_bench_subcommands(bench.add_subparsers(dest="bench_cmd", required=True))

    for add_parser in _light_commands().values():
        add_parser(sub)

    from tokenmill.quant.cli import add_quantize_parser

    add_quantize_parser(sub)

    evaluate = sub.add_parser("eval", help="Quality lab: perplexity, KL divergence, regression verdicts.",
                              description="The accuracy side of the bench lab (docs/quality.md).")
    from tokenmill.bench.quality.cli import add_eval_subcommands

    add_eval_subcommands(evaluate.add_subparsers(dest="eval_cmd", required=True))
    return parser


def _light_commands() -> dict:
    """Commands that never load the engine (torch costs 2 s of start-up and ~200 MB resident,
    which a proxy, a watcher or a file generator has no use for): name -> its parser builder."""
    from tokenmill.gateway.cli import add_gateway_parser
    from tokenmill.observability.dashboards import add_dashboards_parser
    from tokenmill.observability.rules import add_rules_parser
    from tokenmill.observability.watch.cli import add_watch_parser

    return {"gateway": add_gateway_parser, "watch": add_watch_parser, "rules": add_rules_parser,
            "dashboards": add_dashboards_parser}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    light = _light_commands().get(argv[0]) if argv else None
    if light is not None:
        parser = argparse.ArgumentParser(prog="tokenmill")
        light(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)  # configures its own logging
    args = build_parser().parse_args(argv)
    if args.func is not _cmd_serve:  # serve configures its own logging (--log-level)
        # One-time long work (compiling the CPU kernels) announces itself on stderr.
        logging.basicConfig(format="%(message)s")
        logging.getLogger("tokenmill.model.kernels").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
