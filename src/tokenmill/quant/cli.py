"""`tokenmill quantize SRC DST`: the subcommand's arguments and entry point."""

from __future__ import annotations

import argparse
import sys

from tokenmill.quant.convert import GROUP_SIZES, METHODS, QuantizeOptions


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="Quantize a float checkpoint's linear layers to int8 or int4 (optionally with AWQ).",
        description="Write a quantized copy of a checkpoint that `tokenmill serve/generate --model DST` load and run "
                    "with the CPU kernels' integer products. Only the decoder layers' projections (q/k/v/o, "
                    "gate/up/down) are quantized; embeddings, norms and lm_head stay float. int8: symmetric, one "
                    "float16 scale per output channel (tokenmill's layout, exact as Q8_0 blocks). int4: groups of "
                    "--group-size input columns with a float16 scale and a zero point each, written in AutoAWQ's gemm "
                    "layout with its quantization_config (readable by AWQ tools). See docs/quantization.md.",
        epilog="example: tokenmill quantize model.gguf out-int4 --method int4 --group-size 128 --awq "
               "--calibration-text corpus.txt")
    p.add_argument("src", help="A Hugging Face safetensors checkpoint directory or a .gguf file (dequantized to "
                               "float32 first; DST then gets config.json and tokenizer files built from its metadata).")
    p.add_argument("dst", help="Output directory (created; must not exist or be empty).")
    p.add_argument("--method", required=True, choices=METHODS, help="int8 (per output channel) or int4 (per group).")
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help="int4: input columns sharing one scale and zero point. (default: 128)")
    p.add_argument("--awq", action="store_true",
                   help="Activation-aware scaling (AWQ): per-input-channel scales searched on --calibration-text to "
                        "minimise each projection's output error, folded into the preceding norm / projection.")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="UTF-8 text the float model runs on to measure activations (needed with --awq).")
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                   help="Tokens of the calibration text to use, from its start. (default: 4096)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tokenmill.quant.convert import quantize_checkpoint

    if args.awq and not args.calibration_text:
        print("error: --awq needs --calibration-text FILE.", file=sys.stderr)
        return 2
    if args.method == "int8" and args.group_size is not None:
        print("error: --group-size applies to int4 (int8 has one scale per output channel).", file=sys.stderr)
        return 2
    options = QuantizeOptions(args.method, args.group_size or 128, args.awq, args.calibration_text,
                              args.calibration_tokens)
    try:
        quantize_checkpoint(args.src, args.dst, options)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
