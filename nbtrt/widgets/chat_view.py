"""How the chat cell draws a conversation: one pane per side, each a history that scrolls inside
a fixed height. Every piece of text is HTML-escaped and shown with its line breaks (``pre-wrap``):
a user who types ``**bold**`` or ``<b>`` sees exactly that, and so does a model that writes it.

The history box is a flex column in reverse (``column-reverse``), newest turn first among its
children: a browser then keeps such a box scrolled to its bottom as it grows, so a streaming
answer stays in view without any script, and a person who scrolls up to read stays there.

CSS classes (the browser test queries them; ``tests/browser_chat.md`` lists them all):
``nbtrt-chat-history`` (the scrolling box), ``nbtrt-chat-turn`` (one turn; ``nbtrt-chat-live``
while it streams), inside a turn ``nbtrt-chat-user``, ``nbtrt-chat-assistant``,
``nbtrt-chat-stats``, ``nbtrt-chat-marker``, ``nbtrt-chat-error`` and ``nbtrt-chat-compare-line``.

>>> pane = Pane("engine (torch)", "nbtrt-chat-engine")  # doctest: +SKIP
>>> pane.show([("Hi <b>", Reply(text="Hello!", finish="stop"))])  # doctest: +SKIP
"""
from __future__ import annotations

import html

import ipywidgets as w

from ..transcript import Reply

_TEXT = "white-space:pre-wrap; overflow-wrap:anywhere; line-height:1.4; margin:2px 0"


def _text(text: str) -> str:
    return html.escape(text, quote=False)


def _role(name: str) -> str:
    # a styled span, not <b>: the message itself holds no element at all, whatever was typed
    return f"<span class='nbtrt-chat-role' style='font-weight:bold'>{name}:</span> "


def turn_html(user: str, reply: Reply | None, compare_line: str | None = None, live: bool = False) -> str:
    """One turn as HTML: the user's message and the answer (as plain text), then the answer's
    marker, error, stats line and (compare mode) the compare line."""
    parts = [f"<div class='nbtrt-chat-user' style='{_TEXT}; background:#eef3fb; padding:4px 6px; border-radius:4px'>"
             f"{_role('You')}{_text(user)}</div>"]
    if reply is not None:
        cursor = " ▌" if live else ""
        marker = f" <span class='nbtrt-chat-marker' style='color:#b00; font-weight:bold'>{reply.marker}</span>" \
            if reply.marker else ""
        parts.append(f"<div class='nbtrt-chat-assistant' style='{_TEXT}; padding:4px 6px'>"
                     f"{_role('Assistant')}{_text(reply.text)}{cursor}{marker}</div>")
        if reply.error:
            parts.append(f"<div class='nbtrt-chat-error' style='{_TEXT}; color:#b00'>error: {_text(reply.error)}</div>")
        summary = reply.summary() if reply.stats.start is not None else ""
        if summary:
            parts.append(f"<div class='nbtrt-chat-stats' style='color:#666; font-size:85%; margin:0 6px 4px'>"
                         f"{_text(summary)}</div>")
    if compare_line:
        parts.append(f"<div class='nbtrt-chat-compare-line' style='color:#444; font-size:85%; margin:0 6px 4px'>"
                     f"compare: {_text(compare_line)}</div>")
    return "".join(parts)


class Pane:
    """One side of the chat: a title, the turns in a scrolling box of fixed ``height``, the answer
    being streamed at the bottom, and the latest answer's stats under the box."""

    def __init__(self, title: str, css_class: str, height: str = "360px"):
        self.title = w.HTML(f"<b>{_text(title)}</b>")
        self.live = self._turn_widget("")
        self.live.add_class("nbtrt-chat-live")
        self.live.layout.display = "none"
        self.turns: list[w.HTML] = []
        self.history = w.Box([self.live], layout=w.Layout(height=height, overflow="auto", flex_flow="column-reverse",
                                                          border="1px solid #eee", padding="2px"))
        self.history.add_class("nbtrt-chat-history")
        # the latest answer's tokens, TTFT and tokens/s; its height is kept when empty so that
        # nothing under the pane (the input) moves when the first answer starts
        self.stats = w.HTML(layout=w.Layout(min_height="24px"))
        self.stats.add_class("nbtrt-chat-latest-stats")
        self.box = w.VBox([self.title, self.history, self.stats],
                          layout=w.Layout(flex="1 1 0", min_width="0", border="1px solid #ddd", padding="4px"))
        self.box.add_class(css_class)

    @staticmethod
    def _turn_widget(value: str) -> w.HTML:
        # a flex item that keeps its height: the box scrolls instead of squeezing the turns
        widget = w.HTML(value, layout=w.Layout(flex="0 0 auto", width="100%"))
        widget.add_class("nbtrt-chat-turn")
        return widget

    def set_title(self, title: str) -> None:
        self.title.value = f"<b>{_text(title)}</b>"

    def show(self, turns: list[tuple]) -> None:
        """Draw the finished turns: ``(user, reply)`` or ``(user, reply, compare_line)`` each; the
        live answer is dropped (it is now the last turn)."""
        values = [turn_html(*turn) for turn in turns]
        for widget, value in zip(self.turns, values):
            if widget.value != value:
                widget.value = value
        for widget in self.turns[len(values):]:
            widget.close()
        self.turns = self.turns[:len(values)] + [self._turn_widget(v) for v in values[len(self.turns):]]
        self.live.layout.display = "none"
        self.history.children = [self.live, *reversed(self.turns)]  # column-reverse: the first child is at the bottom
        self.live.value = ""
        if not turns:
            self.stats.value = ""

    def show_live(self, user: str, reply: Reply) -> None:
        """The answer being streamed, as it grows."""
        self.live.value = turn_html(user, reply, live=True)
        self.live.layout.display = ""
        self.stats.value = reply.summary()


def labelled(owner, classes: dict[str, str]) -> None:
    """Give ``owner``'s widgets (by attribute name) a CSS class each, for the browser test."""
    for name, css_class in classes.items():
        getattr(owner, name).add_class(css_class)
