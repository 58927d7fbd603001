"""``/tokenize`` and ``/detokenize``: the served model's tokenizer."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from mlx_dist.server.errors import bad, responses
from mlx_dist.server.routes.deps import Ready
from mlx_dist.server.schemas import DetokenizeRequest, TokenizeRequest
from mlx_dist.server.validation import chat_prompt, check_ids, check_text

router = APIRouter()


@router.post("/tokenize", responses=responses(400, 401, 404, 413, 422, 503))
async def tokenize(req: TokenizeRequest, st: Ready):
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad("give either prompt or messages", "prompt")
    if req.messages is not None:
        ids = await asyncio.to_thread(chat_prompt, st, req)
    else:
        ids = await asyncio.to_thread(
            st.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens
        )
    return {"tokens": ids, "count": len(ids), "max_model_len": st.context_limit}


@router.post("/detokenize", responses=responses(400, 401, 404, 413, 422, 503))
async def detokenize(req: DetokenizeRequest, st: Ready):
    check_text(req.model_dump(), "")
    st.check_model(req.model)
    ids = check_ids(st, req.tokens, "tokens")
    return {"prompt": await asyncio.to_thread(st.tokenizer.decode, ids)}
