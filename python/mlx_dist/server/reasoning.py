"""Reasoning apart from the answer: a ``<think>...</think>`` block at the
start of the output (Qwen3, DeepSeek-R1, GLM-4.5, QwQ) goes to
``reasoning_content``, the rest to the parser of the answer. A template
may open the block in the prompt (``<|im_start|>assistant\\n<think>\\n``):
the output then starts inside it (``thinking``). gpt-oss's analysis
channel is read by its own parser (:mod:`.tools.gpt_oss`)."""

from __future__ import annotations

from mlx_dist.server.tools.parser import BufferedMachine, Delta, OutputParser
from mlx_dist.server.tools.scan import held

OPEN, CLOSE = "<think>", "</think>"

# reasoning_format's values: llama-server's names ("deepseek": reasoning
# apart; "none": left in the text), and "auto": apart where the template
# has <think> or is gpt-oss's.
REASONING_FORMATS = ("auto", "deepseek", "none")


def inside_think(prompt: str) -> bool:
    """Whether ``prompt`` ends inside an open ``<think>`` block."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


class ThinkSplitter(BufferedMachine):
    """An output parser: the think block to reasoning (its spaces at
    either end left out), what follows to ``inner``."""

    def __init__(self, inner: OutputParser, *, thinking: bool = False):
        self.inner = inner
        self.state = "think" if thinking else "start"
        self.buf = ""
        self.leading = True  # no reasoning text given yet
        self.space = ""  # spaces at the reasoning's end so far, held

    def finish(self) -> Delta:
        return super().finish().add(self.inner.finish())

    def _run(self, final: bool, out: Delta) -> None:
        while True:
            if self.state == "start":
                rest = self.buf.lstrip()
                if rest.startswith(OPEN):
                    self.buf, self.state = rest[len(OPEN) :], "think"
                    continue
                if OPEN.startswith(rest) and not final:
                    return  # perhaps <think> still arriving
                self.state = "answer"
            elif self.state == "think":
                at = self.buf.find(CLOSE)
                if at >= 0:
                    self._reason(self.buf[:at], True, out)
                    self.buf, self.state = self.buf[at + len(CLOSE) :], "after"
                    continue
                cut = len(self.buf) - (0 if final else held(self.buf, (CLOSE,)))
                self._reason(self.buf[:cut], final, out)
                self.buf = self.buf[cut:]
                return
            elif self.state == "after":
                # The space between the block and the answer is neither.
                rest = self.buf.lstrip()
                if not rest and not final:
                    self.buf = ""
                    return
                self.buf, self.state = rest, "answer"
            else:
                if self.buf:
                    out.add(self.inner.feed(self.buf))
                self.buf = ""
                return

    def _reason(self, text: str, closing: bool, out: Delta) -> None:
        if self.leading:
            text = text.lstrip()
            self.leading = not text
        text = self.space + text
        body = text.rstrip()
        self.space = "" if closing else text[len(body) :]
        out.reasoning += body
