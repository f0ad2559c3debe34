"""Offline batch inference with vLLM's `LLM` shape: generate() and chat()."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig, create_engine_config
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer
from tokenmill.tools import ToolsRequest, ToolTemplate

PromptType = str | dict[str, Any]
_GEN_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def default_sampling_params(model_dir: str) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (vLLM does the same)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    # Like vLLM: only these keys; do_sample is ignored.
    defaults = {k: cfg[k] for k in _GEN_CONFIG_KEYS if k in cfg}
    if "max_new_tokens" in cfg:
        defaults["max_tokens"] = cfg["max_new_tokens"]
    return defaults


class LLM:
    """Generate text for many prompts at once with continuous batching.

    Args:
        model: a Hugging Face checkpoint directory or a GGUF file; default:
            SmolLM2-135M-Instruct (see tokenmill.model.default_model).
        **engine_args: see `tokenmill.config.create_engine_config` (dtype, device,
            max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
            kv_cache_memory_bytes, num_kv_blocks, enable_prefix_caching, seed,
            skip_tokenizer_init, quantization).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.config: EngineConfig = create_engine_config(model, **engine_args)
        # skip_tokenizer_init: token ids in, token ids out (checkpoints without a tokenizer).
        self.tokenizer = None if self.config.skip_tokenizer_init else Tokenizer.load(self.config.model_path)
        self.engine = EngineCore(self.config)
        self.processor = OutputProcessor(self.tokenizer, self.config.model.eos_token_ids, self.config.model.vocab_size)
        self._defaults = default_sampling_params(self.config.model_path)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self._require_tokenizer("get_tokenizer()")

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs the tokenizer, which this LLM skipped (skip_tokenizer_init=True); "
                             "pass prompts as {'prompt_token_ids': [...]}.")
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self._defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or {"prompt_token_ids": [...]}, or {"prompt": text}).

        Returns one RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = self._params_for(len(prompts), sampling_params)
        return self._generate([self._tokenize(p) for p in prompts], params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation or a list of them.

        With `tools` (OpenAI's tool objects; `tool_choice` and `parallel_tool_calls` as in
        the API), the tools go into the prompt, the output is decoded under the tool-call
        grammar, and each CompletionOutput's `tool_calls` holds the calls it made (its
        `text` stays the raw output). Messages may hold assistant `tool_calls` and `tool`
        turns, as in the API.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = self._params_for(len(conversations), sampling_params)
        tokenizer = self._require_tokenizer("chat()")
        request = ToolsRequest.parse(tools, tool_choice, parallel_tool_calls)
        template = ToolTemplate.of(tokenizer.chat_template)
        if request is not None:
            params_list = [dataclasses.replace(p, structured_outputs=template.constraint(request, p.structured_outputs))
                           for p in params_list]
        prompts = []
        for conv in conversations:
            conv, variables = template.messages(list(conv), request)
            # The template writes BOS itself when the model wants one (HF's tokenize=True).
            text = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **variables)
            prompts.append((text, tokenizer.encode(text, add_special_tokens=False)))
        outputs = self._generate(prompts, params_list, use_tqdm)
        if request is not None:
            for out in outputs:
                for o in out.outputs:
                    o.tool_calls = template.parse(o.text)[1]
        return outputs

    def stream(self, prompt: PromptType | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt (text, prompt dict, or token ids), yielding text as it
        is decoded. Other requests already queued on this LLM keep running alongside."""
        params = sampling_params or self.get_default_sampling_params()
        if params.n != 1:
            raise ValueError("stream() takes n=1; use generate() for several samples.")
        text, token_ids = (None, list(prompt)) if isinstance(prompt, list) else self._tokenize(prompt)
        self.engine.validate_prompt(token_ids)
        rid = self._add_request(text, token_ids, params, delta=True)
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for out in self._step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out.outputs[0].text
        finally:
            if not done:  # the caller stopped early: drop the request, free its blocks
                self.engine.abort_requests(self.processor.engine_ids(rid))
                self.processor.abort_request(rid)

    # ------------------------------------------------------------------------------------
    def _params_for(self, n: int, sp: SamplingParams | Sequence[SamplingParams] | None) -> list[SamplingParams]:
        if sp is None:
            sp = self.get_default_sampling_params()
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} sampling params for {n} prompts.")
        return list(sp)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer("a text prompt").encode(prompt)
        if "prompt" in prompt:
            return prompt["prompt"], self._require_tokenizer("a text prompt").encode(prompt["prompt"])
        raise ValueError("a prompt must be a string, {'prompt': str} or {'prompt_token_ids': [...]}.")

    def _generate(
        self, prompts: list[tuple[str | None, list[int]]], params_list: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        # Validate every prompt and grammar before queueing any, so a bad one leaves nothing
        # behind; each request then copies the grammar compiled here.
        grammars = []
        for (_, token_ids), params in zip(prompts, params_list):
            self.engine.validate_prompt(token_ids)
            grammars.append(self.processor.grammar(params))
        ids = [self._add_request(text, token_ids, params, grammar=grammar)
               for (text, token_ids), params, grammar in zip(prompts, params_list, grammars)]
        return self._run(ids, use_tqdm)

    def _add_request(
        self, text: str | None, token_ids: list[int], params: SamplingParams, delta: bool = False, grammar: Any = None
    ) -> str:
        request_id = str(next(self._counter))
        children = self.processor.add_request(request_id, text, token_ids, params, delta=delta, grammar=grammar)
        for i, (cid, child_params, matcher) in enumerate(children):
            leader = children[0][0] if i > 0 else None
            self.engine.add_request(
                EngineCoreRequest(cid, token_ids, child_params, group_leader_id=leader, matcher=matcher)
            )
        return request_id

    def _step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs it produced (stop-string hits aborted)."""
        outputs, to_abort = self.processor.process_outputs(self.engine.step())
        if to_abort:
            self.engine.abort_requests(to_abort)
        return [out for out, _times in outputs]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from rich.progress import Progress

        finished: dict[str, RequestOutput] = {}
        with Progress(disable=not use_tqdm, transient=True) as progress:
            task = progress.add_task("Generating", total=len(request_ids))
            while self.engine.has_unfinished_requests():
                for out in self._step():
                    if out.finished:
                        finished[out.request_id] = out
                        progress.advance(task)
        return [finished[rid] for rid in request_ids]
