"""gpt-oss's output (OpenAI's harmony format): messages, each a header
and a body, ``<|channel|>analysis<|message|>...<|end|>`` for reasoning,
``<|channel|>final<|message|>...`` for the answer, and
``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}``
for a call (``<|call|>`` and ``<|return|>`` end the output: they are stop
tokens, so the text seldom has them). The recipient may come before the
channel (``<|start|>assistant to=functions.NAME<|channel|>commentary``)."""

from __future__ import annotations

import re
from collections.abc import Callable

from mlx_dist.server.tools.parser import BufferedMachine, CallDelta, Delta, new_call_id
from mlx_dist.server.tools.scan import find_first, held, json_opening

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_OPENS = (START, CHANNEL)
_MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
_RECIPIENT = re.compile(r"to=(\S+?)(?=\s|<\||$)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
# A header this long without its <|message|> is no header: give it back as text.
_MAX_HEADER = 1024


class Harmony(BufferedMachine):
    """An :class:`~mlx_dist.server.tools.parser.OutputParser` for the
    whole harmony output: analysis to reasoning (to text when
    ``reasoning`` is off), final and commentary to text, calls to calls
    (only with ``calls``; else their arguments are dropped, as the
    request asked for none)."""

    name = "gpt-oss"
    # <|call|> ends a call, and is a stop token already.
    end = None

    def __init__(
        self,
        *,
        calls: bool = True,
        reasoning: bool = True,
        new_id: Callable[[], str] = new_call_id,
    ):
        self.want_calls = calls
        self.reasoning = reasoning
        self.new_id = new_id
        self.buf = ""
        self.mode = "outside"
        self.kind = "content"
        self.args = ""
        self.given = 0
        self.calls = 0

    def _run(self, final: bool, out: Delta) -> None:
        while True:
            if self.mode == "outside":
                m = find_first(self.buf, _OPENS)
                if m is None:
                    cut = len(self.buf) - (0 if final else held(self.buf, _OPENS))
                    out.content += self.buf[:cut]
                    self.buf = self.buf[cut:]
                    return
                out.content += self.buf[: m[0]]
                self.buf = self.buf[m[0] :]
                self.mode = "header"
            elif self.mode == "header":
                at = self.buf.find(MESSAGE)
                if at < 0:
                    if final or len(self.buf) > _MAX_HEADER:
                        out.content += self.buf
                        self.buf, self.mode = "", "outside"
                    return
                self._open(self.buf[:at], out)
                self.buf = self.buf[at + len(MESSAGE) :]
                self.mode = "body"
            else:
                m = find_first(self.buf, (*ENDS, *_OPENS))
                if m is None:
                    cut = len(self.buf) - (0 if final else held(self.buf, _MARKERS))
                    self._body(self.buf[:cut], out)
                    self.buf = self.buf[cut:]
                    return
                self._body(self.buf[: m[0]], out)
                skip = len(m[1]) if m[1] in ENDS else 0
                self.buf = self.buf[m[0] + skip :]
                self.mode = "outside"

    def _open(self, header: str, out: Delta) -> None:
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        to = recipient.group(1) if recipient else ""
        if to.startswith("functions."):
            self.kind = "call" if self.want_calls else "drop"
            if self.want_calls:
                out.calls.append(CallDelta(self.calls, self.new_id(), to[len("functions.") :]))
                self.calls += 1
            self.args, self.given = "", 0
        elif channel is not None and channel.group(1) == "analysis" and self.reasoning:
            self.kind = "reasoning"
        else:
            self.kind = "content"

    def _body(self, text: str, out: Delta) -> None:
        if self.kind == "reasoning":
            out.reasoning += text
        elif self.kind == "content":
            out.content += text
        elif self.kind == "call":
            self.args += text
            # Space around the JSON is left out, so what is given stays a prefix.
            args = self.args.strip()
            if len(args) > self.given:
                out.calls.append(CallDelta(self.calls - 1, arguments=args[self.given :]))
                self.given = len(args)

    @staticmethod
    def opening(name: str | None) -> str:
        head = f"{CHANNEL}commentary to=functions."
        return head if name is None else f"{head}{name} {CONSTRAIN}json{MESSAGE}"

    def steer(self, name: str | None, schema: dict | None) -> str:
        return self.opening(name) + (json_opening(schema) if name else "")
