"""What a model's output holds, as it arrives: text, reasoning and tool
calls (:class:`Delta`), and the machine that finds one family's calls in
the text (:class:`ToolCallParser`, over a :class:`CallFormat`).

Every parser is fed the output piece by piece and gives, for each piece,
what it adds; pieces that may be the start of a marker are held back until
the next piece tells, so no marker reaches the text. Parsing the whole
output at once gives the same result as any split of it: a parser only
decides on what it has seen, and never takes back what it gave."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mlx_dist.server.tools.scan import held, json_opening


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A piece of tool call ``index``: its first carries ``id`` and
    ``name``; every one may carry more of its arguments' JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """What a piece of output adds."""

    content: str = ""
    reasoning: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def add(self, other: Delta) -> Delta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls.extend(other.calls)
        return self


class OutputParser(Protocol):
    """Fed the output in pieces; ``finish`` gives what was held back."""

    def feed(self, text: str) -> Delta: ...

    def finish(self) -> Delta: ...


class BufferedMachine:
    """An output parser run as a state machine over the text held in
    ``buf``: ``feed`` adds text and runs what can be decided so far,
    ``finish`` the rest. A subclass sets ``buf`` and writes ``_run``."""

    buf: str

    def feed(self, text: str) -> Delta:
        out = Delta()
        self.buf += text
        self._run(False, out)
        return out

    def finish(self) -> Delta:
        out = Delta()
        self._run(True, out)
        return out

    def _run(self, final: bool, out: Delta) -> None:
        raise NotImplementedError


class PlainText:
    """Output as it comes: all text."""

    def feed(self, text: str) -> Delta:
        return Delta(content=text)

    def finish(self) -> Delta:
        return Delta()


@dataclass
class Found:
    """A call found in a region: its name, and its arguments' JSON text so
    far (each scan's is a prefix of the next's)."""

    name: str
    arguments: str


@dataclass
class Region:
    """What a format reads in a region (from its start marker on).
    ``end``: where the region ends, the rest being text again (None: not
    known yet; at the end of the output, the end). ``text``: the region is
    no call after all (its marker is text)."""

    calls: list[Found] = field(default_factory=list)
    end: int | None = None
    text: bool = False


@dataclass
class Start:
    """Where a region starts in text (None: nowhere yet), the length of its
    marker, and, with none, how many characters at the end may begin one."""

    at: int | None
    length: int = 0
    hold: int = 0


class CallFormat:
    """One family's tool-call syntax: the markers that open a region and
    how a region reads. ``opening`` is the start of a call in this format,
    which steers a model into calling (``tool_choice``)."""

    name = "base"
    starts: tuple[str, ...] = ()
    # The marker that ends one call, where the format has one.
    end: str | None = None

    def find_start(self, text: str, at_start: bool) -> Start:
        """The first region's start in ``text`` (``at_start``: nothing but
        whitespace came before in the output)."""
        found = [(i, m) for m in self.starts if (i := text.find(m)) >= 0]
        if not found:
            return Start(None, hold=held(text, self.starts))
        i, marker = min(found, key=lambda f: (f[0], -len(f[1])))
        return Start(i, len(marker))

    def scan(self, region: str, final: bool) -> Region:
        raise NotImplementedError

    def opening(self, name: str | None) -> str:
        """The text that begins a call (of ``name``: up to its arguments)."""
        raise NotImplementedError

    def steer(self, name: str | None, schema: dict | None) -> str:
        """What an answer is begun with to have a call (of ``name``, with
        its ``schema``: into the arguments too)."""
        return self.opening(name) + (json_opening(schema) if name else "")


class ToolCallParser:
    """Text with tool calls in ``fmt``'s syntax, as deltas. A region that
    turns out to be no call (malformed before its name was read) is given
    back as text; a call whose name was read stays a call, with the
    arguments the model wrote (checked afterwards, by the caller)."""

    def __init__(self, fmt: CallFormat, new_id: Callable[[], str] = new_call_id):
        self.fmt = fmt
        self.new_id = new_id
        self.pending = ""
        self.region: str | None = None
        self.marker = 0
        # The open region's calls: [global index, argument characters given].
        self.shown: list[list[int]] = []
        self.calls = 0
        self.at_start = True

    def feed(self, text: str) -> Delta:
        out = Delta()
        self._run(text, False, out)
        return out

    def finish(self) -> Delta:
        out = Delta()
        self._run("", True, out)
        return out

    def _text(self, text: str, out: Delta) -> None:
        out.content += text
        if text.strip():
            self.at_start = False

    def _run(self, text: str, final: bool, out: Delta) -> None:
        while True:
            if self.region is None:
                self.pending += text
                text = ""
                s = self.fmt.find_start(self.pending, self.at_start)
                if s.at is None:
                    cut = len(self.pending) - (0 if final else s.hold)
                    self._text(self.pending[:cut], out)
                    self.pending = self.pending[cut:]
                    return
                self._text(self.pending[: s.at], out)
                self.region, self.marker = self.pending[s.at :], s.length
                self.pending = ""
                self.shown = []
            else:
                self.region += text
                text = ""
            r = self.fmt.scan(self.region, final)
            if (r.text or (final and not r.calls)) and not self.shown:
                # Not a call: its marker is text (at least a character of
                # it, so that the same place cannot open a region again).
                n = max(self.marker, 1)
                self._text(self.region[:n], out)
                text, self.region = self.region[n:], None
                continue
            self._show(r.calls, out)
            if r.end is None and not final and not r.text:
                return
            end = len(self.region) if r.end is None or r.text else r.end
            text, self.region = self.region[end:], None
            self.at_start = False

    def _show(self, found: list[Found], out: Delta) -> None:
        for k, f in enumerate(found):
            if k == len(self.shown):
                self.shown.append([self.calls, len(f.arguments)])
                out.calls.append(CallDelta(self.calls, self.new_id(), f.name, f.arguments))
                self.calls += 1
                continue
            index, given = self.shown[k]
            if len(f.arguments) > given:
                out.calls.append(CallDelta(index, arguments=f.arguments[given:]))
                self.shown[k][1] = len(f.arguments)
