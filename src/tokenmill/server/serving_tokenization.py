"""vLLM's /tokenize and /detokenize; /v1/models and /version."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

import tokenmill
from tokenmill.server.errors import bad_request
from tokenmill.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from tokenmill.server.serving_chat import render_chat
from tokenmill.server.serving_engine import OpenAIServing
from tokenmill.server.structured import tools_from


def json_response(body: TokenizeResponse | DetokenizeResponse | ModelList | ModelCard | VersionResponse) -> Response:
    return Response(body.model_dump_json(exclude_none=isinstance(body, VersionResponse)),
                    media_type="application/json")


class ServingTokenization(OpenAIServing):
    async def tokenize(self, raw_request: Request) -> Response:
        """Token ids of a prompt, or of chat messages rendered by the chat template:
        {"count", "max_model_len", "tokens", "token_strs"}; token_strs only when asked.

        Not bounded by the context (clients count tokens to decide how to split a text),
        only by the request body limit.
        """
        req = await self.parse(raw_request, TokenizeRequest, {})
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Pass exactly one of prompt or messages.", param="prompt")
        if req.messages is not None:
            text = render_chat(self.require_tokenizer("messages"), req.messages, req.add_generation_prompt,
                               tools=tools_from(req.model_extra or {}))
            ids = await self.encode(text, add_special_tokens=False, param="messages")
        else:
            ids = await self.encode(req.prompt, add_special_tokens=req.add_special_tokens, param="prompt")
        strs = [self.tokenizer.decode_token(t) for t in ids] if req.return_token_strs else None
        return json_response(TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                              token_strs=strs))

    async def detokenize(self, raw_request: Request) -> Response:
        req = await self.parse(raw_request, DetokenizeRequest, {})
        self.check_model(req.model)
        tokenizer = self.require_tokenizer("tokens")
        vocab_size = tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range for vocab size {vocab_size}.", param="tokens")
        return json_response(DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False)))

    def models(self, created: int) -> ModelList:
        root = self.engine.config.model_path
        cards = [ModelCard(id=name, created=created, root=root, max_model_len=self.max_model_len)
                 for name in self.settings.served_model_names]
        return ModelList(data=cards)

    def version(self, authorized: bool) -> VersionResponse:
        """Public: the version. With the API key (or when none is set): the engine's settings
        too, with the model as its directory name, never a filesystem path."""
        config = None
        if authorized:
            config = self.engine.config.to_dict()
            config["model"] = Path(self.engine.config.model_path).name
        return VersionResponse(version=tokenmill.__version__, name="tokenmill", config=config)
