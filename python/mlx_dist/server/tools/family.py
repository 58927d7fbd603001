"""Which tool-call syntax a model writes, read from the markers its chat
template holds (the model type where the template renders tools but has
none of them), and the output parser for a request.

A template that does not render tools at all (SmolLM2's, for one) gets the
generic format: Hermes' ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``,
which a system note describes to the model (:mod:`.messages`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mlx_dist.server.reasoning import ThinkSplitter
from mlx_dist.server.tools.deepseek import DeepSeek
from mlx_dist.server.tools.glm import Glm
from mlx_dist.server.tools.gpt_oss import Harmony
from mlx_dist.server.tools.hermes import Hermes
from mlx_dist.server.tools.llama3 import Llama3
from mlx_dist.server.tools.mistral import Mistral
from mlx_dist.server.tools.parser import CallFormat, OutputParser, PlainText, ToolCallParser

FAMILIES = ("hermes", "llama3", "mistral", "gpt-oss", "deepseek", "glm", "generic")

# Markers in a template, most telling first (GLM's and Hermes' share <tool_call>).
_MARKERS = (
    ("<|channel|>", "gpt-oss"),
    ("<arg_key>", "glm"),
    ("tool▁call▁begin", "deepseek"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3"),
    ("<tool_call>", "hermes"),
)
_MODEL_TYPES = {
    "qwen2": "hermes",
    "qwen2_moe": "hermes",
    "qwen3": "hermes",
    "qwen3_moe": "hermes",
    "llama": "llama3",
    "mistral": "mistral",
    "deepseek_v3": "deepseek",
    "glm4_moe": "glm",
    "gpt_oss": "gpt-oss",
}


@dataclass(frozen=True)
class Family:
    """A template's tool-call family. ``renders_tools``: the template
    writes the tools into the prompt itself; ``renders_calls``: it writes
    assistant ``tool_calls`` too; ``thinks``: it knows ``<think>``;
    ``variant``: Mistral's ``NAME[ARGS]`` form, DeepSeek's typed
    ``function<｜tool▁sep｜>`` form."""

    name: str
    renders_tools: bool = False
    renders_calls: bool = False
    thinks: bool = False
    variant: bool = False

    def format(self, tools: list[dict]) -> CallFormat | Harmony:
        if self.name == "gpt-oss":
            return Harmony()
        if self.name == "llama3":
            return Llama3()
        if self.name == "mistral":
            return Mistral(named=self.variant)
        if self.name == "deepseek":
            return DeepSeek(typed=self.variant)
        if self.name == "glm":
            return Glm(tools)
        return Hermes()

    def parser(
        self, tools: list[dict], *, calls: bool, reasoning: bool, thinking: bool
    ) -> OutputParser:
        """A fresh parser of one answer: calls read (when ``calls``), the
        reasoning apart (when ``reasoning``; ``thinking``: the answer
        starts inside the think block)."""
        if self.name == "gpt-oss":
            return Harmony(calls=calls, reasoning=reasoning)
        inner: OutputParser = ToolCallParser(self.format(tools)) if calls else PlainText()
        return ThinkSplitter(inner, thinking=thinking) if reasoning else inner


@functools.lru_cache(maxsize=16)
def detect(template: str | None, model_type: str | None = None) -> Family:
    """The family of the chat template ``template`` (None: no template)."""
    t = template or ""
    renders_tools = "tools" in t
    name = next((f for marker, f in _MARKERS if marker in t), None)
    if name is None:
        name = _MODEL_TYPES.get(model_type or "", "generic") if renders_tools else "generic"
    variant = (
        "[ARGS]" in t if name == "mistral" else "```json" in t if name == "deepseek" else False
    )
    return Family(
        name,
        renders_tools=renders_tools,
        renders_calls="tool_calls" in t,
        thinks="<think>" in t,
        variant=variant,
    )
