"""vLLM's /tokenize and /detokenize, and /v1/models."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from tokenmill.server.errors import bad_request
from tokenmill.server.protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from tokenmill.server.serving_chat import render_chat
from tokenmill.server.serving_engine import OpenAIServing


class ServingTokenization(OpenAIServing):
    async def tokenize(self, raw_request: Request) -> dict[str, Any]:
        """Token ids of a prompt, or of chat messages rendered by the chat template.

        Returns:
            {"count", "max_model_len", "tokens", "token_strs"}; token_strs only when asked.
        """
        req = await self.parse(raw_request, TokenizeRequest, {})
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Pass exactly one of prompt or messages.", param="prompt")
        if req.messages is not None:
            text = render_chat(self.tokenizer, req.messages, req.add_generation_prompt)
            ids = await self.encode(text, add_special_tokens=False)
        else:
            ids = await self.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = [self.tokenizer.decode_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, raw_request: Request) -> dict[str, Any]:
        req = await self.parse(raw_request, DetokenizeRequest, {})
        self.check_model(req.model)
        vocab_size = self.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range for vocab size {vocab_size}.", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def models(self, created: int) -> ModelList:
        root = self.engine.config.model_path
        cards = [ModelCard(id=name, created=created, root=root, max_model_len=self.max_model_len)
                 for name in self.settings.served_model_names]
        return ModelList(data=cards)
