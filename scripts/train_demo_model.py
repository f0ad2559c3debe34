#!/usr/bin/env python
"""Train tokenmill's bundled demo model: a tiny Llama that speaks (and chats in) Shakespeare.

The result is a complete Hugging Face checkpoint (config, bf16 safetensors, byte-level BPE
tokenizer with a chat template, generation config, model card) that tokenmill serves by
default, so tests, docs and `make run` work from a fresh clone without any download.

    python scripts/train_demo_model.py                 # reproduces src/tokenmill/demo_model
    python scripts/train_demo_model.py --max-steps 50 --output-dir /tmp/demo   # smoke run

transformers is used here only as the training reference implementation; tokenmill never
imports it at run time. The defaults take ~12 minutes on 2 idle CPU cores (AVX-512 bf16,
~3,300 tokens/s); expect more when other processes share the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import jinja2
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Order fixes the ids: <|bos|>=0, <|eos|>=1, <|pad|>=2, <|system|>=3, ... <|end|>=6.
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

# Role markers are special tokens; every turn ends with <|end|>, which is also an eos id so
# generation stops at the end of the assistant's turn. The template adds BOS itself, so
# servers must tokenize the rendered prompt without adding special tokens (as HF and vLLM do).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] | trim + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

SYSTEM_PROMPTS = [
    "You are a player upon the stage. Answer in verse.",
    "Thou art a character in a play by William Shakespeare.",
    "Respond as a Shakespearean character would.",
]

SPEECH_RE = re.compile(r"^([A-Za-z][^\n:]*):\n(\S.*)$", re.DOTALL)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--corpus", type=Path, default=REPO_ROOT.parent / "shared/data/tinyshakespeare.txt",
                   help="training text (default: ../shared/data/tinyshakespeare.txt from the repo root)")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "src/tokenmill/demo_model",
                   help="where the checkpoint is written (default: src/tokenmill/demo_model)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="BPE vocabulary size including the 256 byte tokens and special tokens")
    p.add_argument("--hidden-size", type=int, default=320, help="model width")
    p.add_argument("--num-layers", type=int, default=6, help="number of decoder layers")
    p.add_argument("--num-heads", type=int, default=8, help="query heads")
    p.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--intermediate-size", type=int, default=960, help="SwiGLU MLP width (~3x hidden)")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps (sets the cosine schedule)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--chat-fraction", type=float, default=0.25,
                   help="fraction of each batch made of chat-formatted speech/reply examples")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of the corpus")
    p.add_argument("--eval-every", type=int, default=100, help="validation interval in steps")
    p.add_argument("--log-every", type=int, default=20, help="progress line interval in steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-bf16", action="store_true",
                   help="train in fp32 instead of bf16 autocast (autocast measured ~1.5x faster here)")
    p.add_argument("--seed", type=int, default=1234, help="seed for python, numpy and torch")
    return p.parse_args()


# ----------------------------------------------------------------------------- data

def split_corpus(text: str, val_fraction: float) -> tuple[str, str]:
    """Cut at the speech boundary nearest the last `val_fraction` of the text."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - val_fraction))) + 2
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Byte-level: every UTF-8 string (CJK, emoji) maps to byte tokens and round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([train_text], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=False, trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return tok


def speeches(text: str) -> list[tuple[str, str] | None]:
    """(speaker, speech) per blank-line block; None where a block is no speech (breaks pairs)."""
    out: list[tuple[str, str] | None] = []
    for block in text.split("\n\n"):
        m = SPEECH_RE.match(block.strip("\n"))
        out.append((m.group(1), m.group(2).strip()) if m else None)
    return out


def chat_examples(text: str, tok: Tokenizer, seq_len: int, rng: random.Random) -> list[list[int]]:
    """Conversations from consecutive speeches: one speech is the user turn, the next the reply.

    The reply keeps its speaker header ("ROMEO:\\n...") so the model answers in character.
    """
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    sp = speeches(text)
    texts = []
    for i in range(len(sp) - 1):
        num_exchanges = rng.choice([1, 1, 1, 2, 3])
        turns = sp[i : i + 2 * num_exchanges]
        if len(turns) < 2 * num_exchanges or any(t is None for t in turns):
            continue
        messages = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for j, (speaker, speech) in enumerate(turns):
            if j % 2 == 0:  # user: usually the bare line, sometimes with its speaker header
                content = f"{speaker}:\n{speech}" if rng.random() < 0.3 else speech
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "assistant", "content": f"{speaker}:\n{speech}"})
        texts.append(template.render(messages=messages, bos_token=BOS, add_generation_prompt=False))
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encoded if len(e.ids) <= seq_len]


class Batches:
    """Random training batches: BOS + a window starting at a speech, or packed chat examples."""

    def __init__(self, train_text: str, tok: Tokenizer, args: argparse.Namespace, seed: int):
        self.rng = random.Random(seed)
        self.seq_len, self.batch_size = args.seq_len, args.batch_size
        self.bos_id, self.pad_id = tok.token_to_id(BOS), tok.token_to_id(PAD)
        blocks = [b + "\n\n" for b in train_text.split("\n\n")]
        ids, starts = [], []
        # The pre-tokenizer splits at "\n\n" anyway, so per-block encoding equals whole-text encoding.
        for e in tok.encode_batch(blocks, add_special_tokens=False):
            starts.append(len(ids))
            ids.extend(e.ids)
        self.ids = np.array(ids, dtype=np.int64)
        # A plain row holds BOS + seq_len - 1 corpus tokens.
        self.starts = [s for s in starts if s + args.seq_len - 1 <= len(ids)]
        self.chats = chat_examples(train_text, tok, args.seq_len, self.rng)
        self.num_chat_rows = round(args.batch_size * args.chat_fraction)

    def plain_row(self) -> tuple[list[int], list[int]]:
        s = self.rng.choice(self.starts)
        row = [self.bos_id] + self.ids[s : s + self.seq_len - 1].tolist()
        return row, list(row)

    def chat_row(self) -> tuple[list[int], list[int]]:
        row: list[int] = []
        for _ in range(8):  # greedy packing; a few misses then pad the rest
            ex = self.rng.choice(self.chats)
            if len(row) + len(ex) <= self.seq_len:
                row += ex
        num_pad = self.seq_len - len(row)
        return row + [self.pad_id] * num_pad, row + [-100] * num_pad

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.chat_row() if i < self.num_chat_rows else self.plain_row()
                for i in range(self.batch_size)]
        input_ids = torch.tensor([r[0] for r in rows])  # [batch, seq_len]
        labels = torch.tensor([r[1] for r in rows])  # [batch, seq_len], -100 = no loss
        return input_ids, labels


def val_batches(val_text: str, tok: Tokenizer, seq_len: int, batch_size: int):
    """Contiguous, non-overlapping windows over the held-out text, each prefixed with BOS."""
    ids = tok.encode(val_text, add_special_tokens=False).ids
    n = seq_len - 1
    rows = [[tok.token_to_id(BOS)] + ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    return [torch.tensor(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(model, batches, use_bf16: bool) -> float:
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for x in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
        num = x.numel() - x.shape[0]  # every position but the last predicts a token
        total_loss += loss.item() * num
        total_tokens += num
    model.train()
    return total_loss / total_tokens


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def build_model(args: argparse.Namespace, tok: Tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=[tok.token_to_id(EOS), tok.token_to_id(END)],
        pad_token_id=tok.token_to_id(PAD),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def train(model, data: Batches, val, args: argparse.Namespace) -> tuple[float, float]:
    use_bf16 = not args.no_bf16
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    t0 = time.perf_counter()
    tokens_seen, loss_sum, loss_count = 0, 0.0, 0
    model.train()
    for step in range(args.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        input_ids, labels = data.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += input_ids.numel()
        loss_sum += loss.item()
        loss_count += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (args.max_steps - done)
            print(f"step {done:5d}/{args.max_steps}  loss {loss_sum / loss_count:.3f}  "
                  f"lr {lr_at(step, args):.2e}  {tokens_seen / elapsed:,.0f} tok/s  "
                  f"elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min", flush=True)
            loss_sum, loss_count = 0.0, 0
        if done % args.eval_every == 0 and done != args.max_steps:
            v = evaluate(model, val, use_bf16)
            print(f"          val loss {v:.3f}  ppl {math.exp(v):.1f}", flush=True)
    train_s = time.perf_counter() - t0
    val_loss = evaluate(model, val, use_bf16)
    print(f"final val loss {val_loss:.4f}  perplexity {math.exp(val_loss):.2f}  "
          f"({train_s / 60:.1f} min, {tokens_seen:,} tokens)", flush=True)
    return val_loss, train_s


# ----------------------------------------------------------------------------- saving

def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
         "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END]}, indent=2) + "\n")


def save_checkpoint(model, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):  # nothing from an older run may survive next to the new weights
        stale.unlink()
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(END)]
    # Older readers look for torch_dtype, newer transformers writes dtype: keep both.
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    cfg["eos_token_id"] = eos_ids
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": eos_ids,
        "pad_token_id": tok.token_to_id(PAD),
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 256,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer(tok, out)


# ----------------------------------------------------------------------------- verification

def verify(out: Path, seed: int) -> dict:
    """Reload with transformers and check tokenizer parity, generation and the chat stop token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["ROMEO:\nBut soft!", "  spaces\tand\ttabs\n\n", "你好，世界 🎭🗡️", "naïve café"]:
        hf_ids, raw_ids = hf_tok(text)["input_ids"], raw.encode(text).ids
        assert hf_ids == raw_ids, (text, hf_ids, raw_ids)
        assert raw_ids[0] == raw.token_to_id(BOS) and raw_ids.count(raw.token_to_id(BOS)) == 1
        assert raw.decode(raw_ids, skip_special_tokens=True) == text, text
        assert hf_tok.decode(hf_ids, skip_special_tokens=True) == text, text

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    eos_ids = model.generation_config.eos_token_id
    end_id = raw.token_to_id(END)
    assert end_id in eos_ids, eos_ids
    samples = {}
    torch.manual_seed(seed)
    prompt = hf_tok("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        g = model.generate(**prompt, do_sample=False, max_new_tokens=80, repetition_penalty=1.1)
        samples["greedy"] = hf_tok.decode(g[0], skip_special_tokens=True)
        g = model.generate(**prompt, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=120)
        samples["sampled"] = hf_tok.decode(g[0], skip_special_tokens=True)
        messages = [{"role": "user", "content": "Speak, speak."}]
        chat_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
        chat_text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat_ids["input_ids"][0].tolist() == raw.encode(chat_text, add_special_tokens=False).ids
        g = model.generate(**chat_ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=200)
        reply = g[0, chat_ids["input_ids"].shape[1]:].tolist()
        samples["chat_prompt"] = chat_text
        samples["chat_reply"] = hf_tok.decode(reply, skip_special_tokens=True)
        samples["chat_ends_with_end"] = reply[-1] == end_id
    for k, v in samples.items():
        print(f"--- {k}\n{v}", flush=True)
    assert samples["chat_ends_with_end"], "chat reply did not end with <|end|>"
    return samples


def write_model_card(out: Path, args: argparse.Namespace, model, val_loss: float,
                     train_s: float, samples: dict) -> None:
    num_params = sum(p.numel() for p in model.parameters())
    special = ", ".join(f"`{t}`={i}" for i, t in enumerate(SPECIAL_TOKENS))
    card = f"""# tokenmill demo model

A {num_params / 1e6:.1f}M-parameter Llama (`LlamaForCausalLM`) trained from scratch on
tinyshakespeare, bundled with tokenmill so that `make run`, the docs and the tests work
without downloading anything. It writes recognisable pseudo-Shakespeare and is no use for
anything else.

- Architecture: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} query heads /
  {args.num_kv_heads} KV heads (GQA), SwiGLU intermediate {args.intermediate_size}, RoPE theta 10000,
  max positions 1024, tied embeddings, weights stored in bfloat16.
- Tokenizer: byte-level BPE, vocab {model.config.vocab_size} (any UTF-8 round-trips). Special tokens:
  {special}. Encoding adds `<|bos|>`.
- Chat template: `<|bos|><|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n` (roles system, user,
  assistant); the template adds `<|bos|>` itself, so tokenize the rendered prompt without
  special tokens. Generation stops at `<|eos|>` or `<|end|>` (`eos_token_id` {model.config.eos_token_id}).
- Training: {args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens
  ({args.max_steps * args.batch_size * args.seq_len / 1e6:.1f}M tokens), AdamW lr {args.lr} cosine,
  bf16 autocast, {100 * args.chat_fraction:.0f}% of rows chat examples built from consecutive
  speeches (one speech as the user turn, the next as the assistant's reply), seed {args.seed}.
  Took {train_s / 60:.1f} min wall time on 2 CPU cores (shared; ~12 min on an idle machine).
- Validation (last {100 * args.val_fraction:.0f}% of the corpus, held out): loss {val_loss:.3f},
  perplexity {math.exp(val_loss):.1f} per token.

Reproduce (from the repo root):

```
python scripts/train_demo_model.py --corpus ../shared/data/tinyshakespeare.txt
```

## Samples (transformers, from the saved checkpoint)

Greedy (repetition_penalty 1.1) from `ROMEO:`:

```
{samples["greedy"]}
```

Sampled (temperature 0.8, top_p 0.95) from `ROMEO:`:

```
{samples["sampled"]}
```

Chat, user says "Speak, speak.":

```
{samples["chat_reply"]}
```
"""
    (out / "README.md").write_text(card)


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    text = args.corpus.read_text(encoding="utf-8")
    train_text, val_text = split_corpus(text, args.val_fraction)
    tok = train_tokenizer(train_text, args.vocab_size)
    print(f"corpus {len(text):,} chars: train {len(train_text):,}, val {len(val_text):,}; "
          f"vocab {tok.get_vocab_size()}", flush=True)
    data = Batches(train_text, tok, args, args.seed)
    val = val_batches(val_text, tok, args.seq_len, args.batch_size)
    print(f"train tokens {len(data.ids):,}, chat examples {len(data.chats):,}, "
          f"val windows {sum(len(b) for b in val)}", flush=True)

    model = build_model(args, tok)
    print(f"model parameters {sum(p.numel() for p in model.parameters()):,}", flush=True)
    val_loss, train_s = train(model, data, val, args)

    save_checkpoint(model, tok, args.output_dir)
    samples = verify(args.output_dir, args.seed)
    write_model_card(args.output_dir, args, model, val_loss, train_s, samples)
    for f in args.output_dir.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the files ship in the package
    size_mb = sum(f.stat().st_size for f in args.output_dir.iterdir()) / 1e6
    print(f"saved {args.output_dir} ({size_mb:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
