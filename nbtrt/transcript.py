"""What a chat produced: each answer as a :class:`Reply` (text, token ids, how it ended, timing),
the comparison of two answers token by token, and the transcript written out as JSON and Markdown.

Shared by the chat cell (``nbtrt.widgets.Chat``) and ``nbtrt chat``; nothing here runs a model.

>>> reply = Reply(text="Paris.", token_ids=[7, 8, 2], finish="stop")
>>> reply.marker
''
>>> Reply(finish="length").marker
'[length limit]'
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._io import write_atomic
from .generate import GenerationStats

# how an answer ended -> the marker shown after it ("stop": an end token or a stop string, no marker)
MARKERS = {"stopped": "[stopped]", "length": "[length limit]", "error": "[error]"}


@dataclass
class Reply:
    """One answer. ``finish`` is None while it streams, then ``"stop"`` (the model ended it: an end
    token or a stop string), ``"length"`` (max_new_tokens or the engine's room ran out),
    ``"stopped"`` (Stop / Ctrl-C) or ``"error"``. ``token_ids`` include the end token when there is one.

    >>> Reply(text="Hi", finish="stopped").marker
    '[stopped]'
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    max_new_tokens: int | None = None  # what this answer was allowed (after the engine's room)

    @property
    def marker(self) -> str:
        """"[stopped]", "[length limit]", "[error]", or "" when the model ended the answer itself."""
        return MARKERS.get(self.finish, "")

    def summary(self) -> str:
        """Tokens, TTFT and tokens/s: ``12 tokens · TTFT 85 ms · 40.1 tokens/s``."""
        return self.stats.summary()

    def to_dict(self) -> dict:
        s = self.stats
        return {"text": self.text, "finish": self.finish, "error": self.error, "token_ids": list(self.token_ids),
                "tokens": len(self.token_ids), "prompt_tokens": s.prompt_tokens, "max_new_tokens": self.max_new_tokens,
                "ttft_s": s.ttft_s, "tokens_per_s": s.tokens_per_s, "total_s": s.total_s}


def finish_reason(token_ids: list[int], stop_token_ids, max_new_tokens: int, *, stopped: bool,
                  ended_by_model: bool | None = None) -> str:
    """How an answer ended, from what it produced: Stop wins, then an end token (or the loop's own
    word, ``ended_by_model``, which covers stop strings), then the length limit.

    >>> finish_reason([5, 2], (2,), 8, stopped=False), finish_reason([5, 6], (2,), 2, stopped=False)
    ('stop', 'length')
    """
    if stopped:
        return "stopped"
    if ended_by_model or (token_ids and token_ids[-1] in set(stop_token_ids)):
        return "stop"
    return "length" if len(token_ids) >= max_new_tokens else "stop"  # shorter, not by an end token: a stop string


def first_difference(ours: Reply, theirs: Reply, tokenizer, names: tuple[str, str] = ("engine", "HF")) -> str:
    """The line compare mode shows: ``identical (N tokens)``, or ``first difference at token N:
    engine 'x' vs HF 'y'`` — token ids compared, decoded pieces shown, N counted from 0 over the
    answer's tokens. An answer cut short (Stop, length limit) that agrees as far as it goes is
    ``identical over the first N tokens``, not a difference.

    >>> first_difference(Reply(token_ids=[1, 2]), Reply(token_ids=[1, 2]), tok)  # doctest: +SKIP
    'identical (2 tokens)'
    """
    a, b = list(ours.token_ids), list(theirs.token_ids)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if n is None:
        if len(a) == len(b):
            return f"identical ({len(a)} token{'s' * (len(a) != 1)})"
        n = min(len(a), len(b))
        short_name, short = (names[0], ours) if len(a) < len(b) else (names[1], theirs)
        if short.finish in ("stopped", "length", "error"):
            return f"identical over the first {n} tokens (then {short_name} {short.marker})"

    def piece(ids: list[int]) -> str:
        return f"{tokenizer.decode([ids[n]])!r} (id {ids[n]})" if n < len(ids) else "<end>"

    return f"first difference at token {n}: {names[0]} {piece(a)} vs {names[1]} {piece(b)}"


def to_markdown(turns: list[tuple[str, Reply]], *, system: str | None = None, title: str = "",
                stats: bool = True) -> str:
    """A conversation as Markdown: each user message in a fence (shown exactly as typed, never
    rendered), each answer as text with its marker and (``stats``) its timing line."""
    out = [f"# {title}\n"] if title else []
    if system:
        out.append(f"**System:**\n\n{_fence(system)}\n")
    for user, reply in turns:
        out.append(f"**You:**\n\n{_fence(user)}\n")
        answer = reply.text + (f" {reply.marker}" if reply.marker else "")
        if reply.error:
            answer += f"\n\n*error: {reply.error}*"
        out.append(f"**Assistant:** {answer}\n")
        if stats:
            out.append(f"*{reply.summary()}*\n")
    return "\n".join(out)


def _fence(text: str) -> str:
    """``text`` in a code fence longer than any run of backticks inside it."""
    ticks = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def export(stem: str | Path, turns: list[tuple[str, Reply]], *, system: str | None = None,
           info: dict | None = None, reference: list[tuple[str, Reply | None]] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (atomically: temp file + rename) and return both
    paths. The JSON holds every turn's text, token ids, finish reason and timing; ``info`` (engine,
    sampling) goes in as is; ``reference`` adds compare mode's other side.

    >>> export("work/chats/first", chat.turns)  # doctest: +SKIP
    (PosixPath('work/chats/first.json'), PosixPath('work/chats/first.md'))
    """
    stem = Path(stem)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    if stem.name in ("", ".", ".."):
        raise ValueError(f"export path {str(stem)!r} names no file; give a path such as work/chats/my-chat")
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {}), "system": system,
            "turns": [{"user": user, "assistant": reply.to_dict()} for user, reply in turns]}
    if reference is not None:
        for turn, (_, ref) in zip(data["turns"], reference):
            turn["reference"] = ref.to_dict() if ref is not None else None
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    write_atomic(json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    title = "Chat transcript" + (f" — {info['engine']}" if info and info.get("engine") else "")
    write_atomic(md_path, to_markdown(turns, system=system, title=title))
    return json_path, md_path
