"""OpenAI's API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_dist.server.chat import Answer, answer_stream, collect, start_chat
from mlx_dist.server.errors import GENERATE_ERRORS, bad, responses
from mlx_dist.server.routes.deps import Ready
from mlx_dist.server.run import Run
from mlx_dist.server.schemas import ChatRequest, CompletionRequest
from mlx_dist.server.sse import (
    Echo,
    LegacyLogprobs,
    chat_chunks,
    chat_logprob,
    completion_chunks,
    stream,
    usage,
)
from mlx_dist.server.validation import check_range, check_text, completion_prompt, options

router = APIRouter()


@router.get("/v1/models", responses=responses(401, 503))
async def models(st: Ready):
    return {"object": "list", "data": [st.model_card()]}


@router.get("/v1/models/{model_id:path}", responses=responses(400, 401, 404, 503))
async def model_card(model_id: str, st: Ready):
    check_text(model_id, "model")
    st.check_model(model_id)
    return st.model_card()


@router.post("/v1/chat/completions", responses=responses(*GENERATE_ERRORS, stream=True))
async def chat_completions(req: ChatRequest, request: Request, st: Ready):
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    plan, run = await start_chat(st, req)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = chat_chunks(
            st, answer_stream(run, plan), ident, created, include_usage, plan.top is not None
        )
        return stream(chunks)
    answer = await collect(run, plan, request)
    if answer is None:
        return Response(status_code=499)
    return chat_completion(st, answer, ident, created, plan.top is not None)


def chat_completion(st, answer: Answer, ident: str, created: int, logprobs: bool) -> dict:
    message: dict = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message["tool_calls"] = [c.openai() for c in answer.calls]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": [chat_logprob(st, e) for e in answer.steps]} if logprobs else None,
        "finish_reason": answer.finish_reason,
    }
    if answer.problems:
        # Not OpenAI's: what is wrong with the calls, where there is something.
        choice["tool_call_errors"] = answer.problems
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": st.name,
        "choices": [choice],
        "usage": usage(answer.done),
    }


@router.post("/v1/completions", responses=responses(*GENERATE_ERRORS, stream=True))
async def completions(req: CompletionRequest, request: Request, st: Ready):
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    if req.suffix:
        raise bad("suffix is not supported", "suffix")
    if req.best_of not in (None, 1):
        raise bad("only best_of=1 is supported", "best_of")
    prompt = await asyncio.to_thread(completion_prompt, st, req.prompt)
    opts = options(st, req, prompt, req.max_tokens)
    top = req.logprobs
    check_range(top, "logprobs", 0, 20)
    echo = await asyncio.to_thread(Echo, st, prompt) if req.echo else None
    run = Run(st, prompt, opts, top)
    ident = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream(completion_chunks(st, run, ident, created, echo, include_usage))
    steps, done = await run.collect(request)
    if done is None:
        return Response(status_code=499)
    text = echo.text if echo is not None else ""
    lp = LegacyLogprobs(st) if top is not None else None
    for e in steps:
        if lp is not None:
            lp.add(e, len(text))
        text += echo.step(e) if echo is not None else e.text
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": st.name,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": lp.body() if lp is not None else None,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": usage(done),
    }
