"""``/v1/embeddings``: each input becomes one pooling request (prefill only; see
:mod:`ember.pooling_params`), all running concurrently; ``data[i]`` is input
i's pooled hidden states and ``usage`` counts the inputs' tokens.

The pooling (``LAST`` or ``MEAN``, and whether to L2-normalize) is the
server's (``ember serve --pooling-type``, ``--no-embedding-normalize``); a
request may turn normalization on or off with vLLM's ``normalize`` field.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import Any

import numpy as np

from ember.entrypoints.openai.protocol import (
    APIError,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    random_id,
)
from ember.entrypoints.openai.serving_completion import OpenAIServing, at_location, field_of, request_error
from ember.engine.llm_engine import pooling_sampling_params
from ember.outputs import RequestOutput
from ember.pooling_params import PoolingParams


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """``vector`` as OpenAI sends it: the floats, or for ``base64`` their float32
    little-endian bytes in base64 (``numpy.frombuffer(base64.b64decode(s),
    dtype="<f4")`` reads them back)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    """Answers ``POST /v1/embeddings``.

    Args:
        engine: see :class:`OpenAIServing` (its ``generate`` takes ``pooling_params``).
        pooling: the server's pooling (default: ``LAST``, normalized).
    """

    def __init__(self, engine: Any, pooling: PoolingParams | None = None) -> None:
        super().__init__(engine)
        self.pooling = pooling or PoolingParams()
        self.hidden_size = getattr(getattr(engine.model_config, "hf_config", None), "hidden_size", None)

    async def create_embedding(self, request: EmbeddingRequest, request_id: str | None = None) -> EmbeddingResponse:
        """Raises APIError for invalid requests.

        Args:
            request_id: the client's id (``X-Request-Id``): the response is
                ``embd-<request_id>``, input i's engine request ``embd-<request_id>-i``.
        """
        self.check_model(request.model)
        if request.dimensions is not None and request.dimensions != self.hidden_size:
            raise APIError(f"dimensions: this model's embeddings have {self.hidden_size} dimensions and it cannot "
                           f"return {request.dimensions} (it is not trained for shortened, Matryoshka embeddings); "
                           "omit dimensions", param="dimensions")
        pooling = self.pooling if request.normalize is None else dataclasses.replace(self.pooling,
                                                                                      normalize=request.normalize)
        located = request.located_inputs()
        prompts = []
        for location, value in located:
            is_text = isinstance(value, str)
            ids = await self.tokenize(lambda v=value: self._tokenize(v), location,
                                      len(value) if is_text else 0, 0 if is_text else len(value))
            if len(ids) >= self.max_model_len:
                raise APIError(f"{location} is {len(ids)} tokens long; this model's context window holds "
                               f"{self.max_model_len} tokens, and an input may have at most {self.max_model_len - 1}",
                               param=field_of(location), code="context_length_exceeded")
            prompts.append(ids)
        response_id = f"embd-{request_id}" if request_id else random_id("embd")
        engine_ids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
        tasks = [asyncio.ensure_future(self._pool(ids, engine_id, pooling, request.priority, location))
                 for ids, engine_id, (location, _) in zip(prompts, engine_ids, located, strict=True)]
        try:
            outputs = await asyncio.gather(*tasks)
        finally:  # one failed or the client went: the others are cancelled (which aborts them)
            for t in tasks:
                t.cancel()
        data = []
        for i, out in enumerate(outputs):
            if out.pooled_output is None:
                reason = out.outputs[0].finish_reason if out.outputs else None
                raise APIError(f"the engine returned no embedding for {located[i][0]} (finish reason {reason})", 500,
                               type="internal_server_error")
            data.append(EmbeddingData(index=i, embedding=encode_embedding(out.pooled_output,
                                                                           request.encoding_format)))
        num_tokens = sum(len(ids) for ids in prompts)
        return EmbeddingResponse(id=response_id, model=self.model_name, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))

    def _tokenize(self, value: str | list[int]) -> list[int]:
        """The input's token ids; errors speak of ``input`` (not ``prompt``)."""
        try:
            return self.engine.input_processor.tokenize(value)
        except ValueError as e:
            message = str(e)
            if message.startswith("prompt"):
                raise ValueError("input" + message[len("prompt"):]) from e
            raise

    async def _pool(self, ids: list[int], engine_id: str, pooling: PoolingParams, priority: int,
                    location: str) -> RequestOutput:
        """Run one pooling request to its end; returns its final output."""
        extra: dict[str, Any] = {"pooling_params": pooling}
        if priority != 0:
            extra["priority"] = priority
        gen = self.engine.generate(ids, pooling_sampling_params(), engine_id, **extra)
        final: RequestOutput | None = None
        try:
            async for out in gen:
                final = out
        except ValueError as e:
            if str(e).startswith("request id "):
                raise request_error(e) from e
            raise APIError(at_location(str(e), location), param=field_of(location)) from e
        finally:
            await gen.aclose()
        if final is None:
            raise APIError("the engine returned no output", 500, type="internal_server_error")
        return final

