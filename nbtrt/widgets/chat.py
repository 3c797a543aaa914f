"""The chat cell: ``nbtrt.widgets.Chat(engine)``.

ipywidgets handles a click only while no cell is running, so the answer is generated in a
worker thread: the widgets are shown from the main thread, the worker updates their values
as tokens arrive, and Stop sets a ``threading.Event`` that the generation loop checks before
every step. Compare mode streams the HF reference (``model.generate`` with
``TextIteratorStreamer``) next to the engine, for the same prompt, and says where the two
answers' token ids first differ.

Every message is shown as plain text (HTML-escaped, line breaks kept): what the user typed and
what the model produced, never rendered as Markdown or HTML. The history scrolls inside a pane
of fixed height, newest at the bottom, so the input box stays where it is.

Driven from code (tests, headless notebooks) the same way a person drives it::

    chat = Chat(engine)
    chat.input.value = "Hi!"
    chat.send_button.click()   # or chat.send("Hi!")
    chat.wait()
    chat.transcript()          # the conversation as Markdown
    chat.export("work/chats/first")  # -> (.json path, .md path)
"""
from __future__ import annotations

import html
import threading
import time
from dataclasses import asdict
from pathlib import Path

import ipywidgets as w

from ..chat import ChatSession, HFReference, reference_source
from ..generate import GenerationError, GenerationStats
from ..transcript import Reply, export, first_difference, to_markdown
from .chat_view import Pane, labelled

SAMPLING = ("temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty", "seed")


class Chat:
    """A chat with an engine in the notebook: a scrolling history with each answer's tokens,
    TTFT and tokens/s and a "[stopped]" / "[length limit]" marker when it ended early; a
    multi-line input (Send); Stop (works while tokens stream), Regenerate, Undo last turn, Clear,
    Export (JSON + Markdown); a system prompt; sampling controls; a context meter; and compare
    mode (the HF reference side by side and the first token where they differ; ``reference``: an
    HF directory, an :class:`HFReference` or another engine; default: the HF directory the
    engine was built from).

    >>> chat = Chat(nbtrt.load("work/engine"), system="Answer briefly.")  # doctest: +SKIP
    >>> chat  # doctest: +SKIP
    """

    def __init__(self, engine, *, reference=None, system: str | None = None, compare: bool = False,
                 height: str = "360px", **sampling):
        self.engine = engine
        self.session = ChatSession(engine, system=system)
        self._reference = reference
        self._ref_session: ChatSession | None = None
        self.reference_replies: list[Reply | None] = []  # per turn: compare mode's other answer
        self.comparisons: list[str | None] = []  # per turn: "identical" / "first difference at ..."
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._extra = {k: v for k, v in sampling.items() if k not in SAMPLING}  # e.g. stop_strings
        p = engine.sampling(**sampling)
        limits = engine.limits
        wanted = sampling.get("max_new_tokens") or 256
        initial = {"description_width": "initial"}  # full labels, never "temperat…"
        wide = {"style": initial, "layout": w.Layout(width="440px")}  # room for the label and the track
        self.temperature = w.FloatSlider(value=0.0 if p.greedy else p.temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature (0 = greedy)", **wide)
        self.top_k = w.IntSlider(value=p.top_k, min=0, max=200, description="top-k (0 = off)", **wide)
        self.top_p = w.FloatSlider(value=p.top_p, min=0.05, max=1.0, step=0.05, description="top-p (1 = off)",
                                   **wide)
        self.max_new_tokens = w.IntSlider(value=min(wanted, limits.max_seq_len), min=1,
                                          max=min(2048, limits.max_seq_len), description="max new tokens",
                                          **wide)
        self.repetition_penalty = w.FloatSlider(value=p.repetition_penalty, min=1.0, max=2.0, step=0.05,
                                                description="repetition penalty (1 = off)", **wide)
        self.seed = w.IntText(value=-1 if p.seed is None else p.seed, description="seed (-1 = random)",
                              style=initial)
        self.system_prompt = w.Textarea(value=system or "", placeholder="(none)", rows=2,
                                        description="system prompt", style=initial, layout=w.Layout(width="100%"))
        self.input = w.Textarea(placeholder="Type a message (Enter starts a new line); Send sends it",
                                rows=3, layout=w.Layout(flex="1 1 auto", width="auto"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.regenerate_button = w.Button(description="Regenerate", icon="refresh",
                                          tooltip="ask the last message again (the answer is replaced)")
        self.undo_button = w.Button(description="Undo last turn", icon="undo",
                                    tooltip="take the last message and its answer back (the message returns "
                                            "to the input box)")
        self.clear_button = w.Button(description="Clear", icon="trash")
        self.export_path = w.Text(placeholder="work/chats/chat-<time>", description="export to",
                                  style=initial, layout=w.Layout(flex="1 1 auto", width="auto"))
        self.export_button = w.Button(description="Export", icon="download",
                                      tooltip="write the transcript as .json and .md")
        self.export_status = w.HTML()
        self.compare = w.Checkbox(value=compare, description="compare with the HF reference", indent=False)
        self.compare_note = w.HTML()
        self.comparison = w.HTML(layout=w.Layout(min_height="24px"))  # the latest turn's compare line
        self.context_meter = w.IntProgress(value=0, min=0, max=limits.max_input_len, description="context",
                                           style=initial)
        self.context_label = w.HTML()
        self.status = w.HTML()
        self.engine_pane = Pane(f"engine ({engine.backend})", "nbtrt-chat-engine", height)
        self.reference_pane = Pane("HF reference (transformers generate)", "nbtrt-chat-reference", height)

        self.send_button.on_click(self._on_send)
        self.stop_button.on_click(lambda _: self._cancel.set())
        self.regenerate_button.on_click(self._on_regenerate)
        self.undo_button.on_click(self._on_undo)
        self.clear_button.on_click(self._on_clear)
        self.export_button.on_click(self._on_export)
        self.compare.observe(lambda _: self._layout(), "value")
        self.system_prompt.observe(self._on_system, "value")
        for name in SAMPLING:
            getattr(self, name).observe(self._on_setting, "value")

        self.panes = w.HBox([self.engine_pane.box, self.reference_pane.box])
        rows = [
            self.panes, self.comparison,
            w.HBox([self.input, w.VBox([self.send_button, self.stop_button])]),
            w.HBox([self.regenerate_button, self.undo_button, self.clear_button]),
            self.status,
            w.HBox([self.context_meter, self.context_label]),
            self.system_prompt,
            w.HBox([self.temperature, self.top_k]), w.HBox([self.top_p, self.max_new_tokens]),
            w.HBox([self.repetition_penalty, self.seed]),
            w.HBox([self.compare, self.compare_note]),
            w.HBox([self.export_path, self.export_button]), self.export_status,
        ]
        self.widget = w.VBox(rows)
        labelled(self, {"widget": "nbtrt-chat", "input": "nbtrt-chat-input", "status": "nbtrt-chat-status",
                        "comparison": "nbtrt-chat-compare", "compare_note": "nbtrt-chat-compare-note",
                        "context_meter": "nbtrt-chat-context", "context_label": "nbtrt-chat-context-label",
                        "export_status": "nbtrt-chat-export-status", "system_prompt": "nbtrt-chat-system",
                        "send_button": "nbtrt-chat-send", "stop_button": "nbtrt-chat-stop",
                        "regenerate_button": "nbtrt-chat-regenerate", "undo_button": "nbtrt-chat-undo",
                        "clear_button": "nbtrt-chat-clear", "export_button": "nbtrt-chat-export",
                        "export_path": "nbtrt-chat-export-path"})
        self._layout()
        self._refresh()

    # ------------------------------------------------------------------ Python API
    def send(self, text: str) -> None:
        """Type ``text`` and press Send (returns at once; :meth:`wait` for the answer)."""
        self.input.value = text
        self.send_button.click()

    def stop(self) -> None:
        self.stop_button.click()

    def regenerate(self) -> None:
        """Press Regenerate: the last message is asked again and its answer replaced."""
        self.regenerate_button.click()

    def undo(self) -> None:
        """Press Undo last turn: the last message and its answer go; the message returns to the input."""
        self.undo_button.click()

    def clear(self) -> None:
        self.clear_button.click()

    def export(self, path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the transcript to ``path``.json and ``path``.md (default: the export box, else
        ``work/chats/chat-<time>``) and show where; returns both paths."""
        if self.busy:
            raise GenerationError("an answer is still streaming: wait for it or press Stop, then export")
        stem = path or self.export_path.value.strip() or time.strftime("work/chats/chat-%Y%m%d-%H%M%S")
        info = {"engine": str(getattr(self.engine, "engine_dir", self.engine)), "backend": self.engine.backend,
                "limits": asdict(self.engine.limits),
                "sampling": self._options()}
        compared = any(r is not None for r in self.reference_replies)
        turns = self.session.turns
        reference = list(zip([u for u, _ in turns], self.reference_replies)) if compared else None
        paths = export(stem, turns, system=self.session.system, info=info, reference=reference)
        self.export_status.value = "wrote " + " and ".join(
            f"<code>{html.escape(str(p.resolve()))}</code>" for p in paths)
        return paths

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current answer is complete; False if ``timeout`` ran out first."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def history(self) -> list[dict]:
        """The engine's side of the conversation, as chat messages."""
        return self.session.history

    @property
    def replies(self) -> list[Reply]:
        """The engine's answers (token ids, finish reason, timing), one per turn."""
        return [reply for _, reply in self.session.turns]

    @property
    def compare_line(self) -> str | None:
        """The latest compared turn's line: ``identical (N tokens)`` or ``first difference at token N: ...``."""
        return next((c for c in reversed(self.comparisons) if c), None)

    def transcript(self, side: str = "engine") -> str:
        """The conversation on one side (``"engine"`` or ``"reference"``) as Markdown; the
        reference side holds the turns sent in compare mode."""
        return to_markdown(self._turns(side), system=self.session.system, stats=False)

    def last_answer(self, side: str = "engine") -> str | None:
        """The latest finished answer on one side (``"engine"`` or ``"reference"``)."""
        turns = self._turns(side)
        return turns[-1][1].text if turns else None

    def _turns(self, side: str) -> list[tuple[str, Reply]]:
        if side not in ("engine", "reference"):
            raise ValueError(f"side must be 'engine' or 'reference', not {side!r}")
        turns = self.session.turns
        if side == "engine":
            return turns
        return [(user, ref) for (user, _), ref in zip(turns, self.reference_replies) if ref is not None]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ handlers (main thread)
    def _layout(self) -> None:
        on = self.compare.value
        self.reference_pane.box.layout.display = "" if on else "none"
        self.comparison.layout.display = "" if on else "none"
        cpu = str(getattr(self.engine, "device", "cpu")) == "cpu"
        self.compare_note.value = "" if not on else (
            "<i>both sides run at once and share this machine's CPU cores: each side's tokens/s is lower than "
            "alone</i>" if cpu else "<i>the HF reference runs on the CPU while the engine runs</i>")

    def _options(self) -> dict:
        seed = self.seed.value
        return dict(temperature=self.temperature.value, top_k=self.top_k.value, top_p=self.top_p.value,
                    max_new_tokens=self.max_new_tokens.value, repetition_penalty=self.repetition_penalty.value,
                    seed=None if seed < 0 else seed, **self._extra)

    def _note(self, text: str, error: bool = False) -> None:
        style = "color:#b00" if error else "color:#555"
        self.status.value = f"<span style='{style}'>{html.escape(text)}</span>" if text else ""

    def _on_setting(self, change) -> None:
        if self.busy:
            self._note(f"{change['owner'].description} = {change['new']}: applies to the next answer "
                       "(this one keeps the settings it started with)")

    def _on_system(self, change) -> None:
        if self.busy:
            self._note("system prompt changed: applies to the next answer")
            return
        self.session.system = change["new"] or None
        self._note("system prompt changed: the next answer sees it (with the whole conversation)"
                   if self.session.history else "")
        self._refresh()  # the context meter counts it

    def _on_send(self, _=None) -> None:
        if self.busy:
            self._note("ignored: an answer is still streaming; press Stop or wait for it, then send", error=True)
            return
        text = self.input.value
        if not text.strip():
            self._note("type a message first")
            return
        if self._start(text):
            self.input.value = ""

    def _start(self, text: str) -> bool:
        """Send ``text`` on the engine (and the reference in compare mode); False when refused."""
        self._cancel = threading.Event()
        options = self._options()
        self.session.system = self.system_prompt.value or None
        sides = [("engine", self.session)]
        self._set_busy(True)  # at once: loading the HF reference (first compare) takes seconds
        try:
            if self.compare.value:
                ref = self._reference_session()
                ref.system = self.session.system
                ref.history, ref.replies = list(self.session.history), []  # the same prompt on both sides
                sides.append(("reference", ref))
            jobs = [(side, session, session.send(text, cancel=self._cancel, stats=GenerationStats(), **options))
                    for side, session in sides]
        except (GenerationError, OSError, ValueError, TypeError) as e:
            self._set_busy(False)
            self._note(str(e), error=True)
            return False
        self._note("")
        self.comparison.value = ""
        self._thread = threading.Thread(target=self._run, args=(text, jobs), daemon=True)
        self._thread.start()
        return True

    def _take_last_turn(self, nothing_left: str) -> str | None:
        """The last turn taken back (its user message), or None with a note saying why not."""
        if self.busy:
            self._note("ignored: an answer is still streaming; press Stop first", error=True)
            return None
        user = self._pop_turn()
        if user is None:
            self._note(nothing_left)
        return user

    def _on_regenerate(self, _=None) -> None:
        user = self._take_last_turn("nothing to regenerate yet")
        if user is None:
            return
        if not self._start(user):
            self.input.value = user  # refused (e.g. a bad setting): the message is not lost
        self._refresh()

    def _on_undo(self, _=None) -> None:
        user = self._take_last_turn("nothing to undo")
        if user is None:
            return
        self.input.value = user
        self._note("took the last turn back; its message is in the input box")
        self._refresh()

    def _pop_turn(self) -> str | None:
        user = self.session.undo()
        if user is not None:
            del self.reference_replies[-1:], self.comparisons[-1:]
        return user

    def _on_clear(self, _=None) -> None:
        if self.busy:
            self._cancel.set()
            self.wait()
        self.session.clear()
        self.reference_replies, self.comparisons = [], []
        self._note("")
        self.export_status.value = ""
        self._refresh()

    def _on_export(self, _=None) -> None:
        try:
            self.export()
        except (GenerationError, OSError, ValueError) as e:
            self.export_status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"

    def _reference_session(self) -> ChatSession:
        if self._ref_session is None:
            ref = self._reference
            if ref is None:
                ref = reference_source(self.engine)
                if ref is None:
                    raise GenerationError("cannot find the HF model this engine was built from; "
                                          "pass Chat(engine, reference=HF_DIR)")
            if isinstance(ref, (str, Path)):
                self._note("loading the HF reference…")
                ref = HFReference(ref)
            self._ref_session = ChatSession(ref)
            if not isinstance(ref, HFReference):
                self.reference_pane.set_title(f"reference engine ({getattr(ref, 'backend', type(ref).__name__)})")
        return self._ref_session

    def _refresh(self) -> None:
        """Redraw both panes, the compare line and the context meter from the sessions."""
        turns = self.session.turns
        self.engine_pane.show(turns)
        self.reference_pane.show([(u, r, c) for (u, _), r, c in zip(turns, self.reference_replies, self.comparisons)
                                  if r is not None])
        self.comparison.value = html.escape(f"compare: {self.compare_line}") if self.compare_line else ""
        limit = self.engine.limits.max_input_len
        try:
            used = self.session.context_tokens()
        except GenerationError as e:  # e.g. a tokenizer without a chat template
            self.context_label.value = html.escape(str(e))
            return
        self.context_meter.value = min(used, limit)
        self.context_meter.bar_style = "danger" if used > 0.9 * limit else ("warning" if used > 0.7 * limit else "")
        self.context_label.value = (f"{used} of {limit} tokens (the engine's max_input_len) used by the "
                                    "conversation; the next message adds its own")

    # ------------------------------------------------------------------ worker threads
    def _run(self, user: str, jobs) -> None:
        threads = [threading.Thread(target=self._stream, args=(user, *job), daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(jobs) > 1:
            ref = jobs[1][1].reply
            names = ("engine", "HF" if isinstance(jobs[1][1].engine, HFReference) else "reference")
            line = first_difference(self.session.reply, ref, self.engine.tokenizer, names)
        else:
            ref, line = None, None
        self.reference_replies.append(ref)  # one per turn, so that turns and their other side line up
        self.comparisons.append(line)
        self._refresh()  # (the panes drop their live answer as they draw the finished turn)
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        for button in (self.send_button, self.regenerate_button, self.undo_button, self.export_button):
            button.disabled = busy
        self.stop_button.disabled = not busy

    def _stream(self, user: str, side: str, session: ChatSession, deltas) -> None:
        pane = self.engine_pane if side == "engine" else self.reference_pane
        reply = session.reply
        try:
            for _ in deltas:
                pane.show_live(user, reply)
        except Exception:  # noqa: BLE001  (kept in reply.error, shown in the pane; the engine resets on its next request)
            pass
        pane.stats.value = reply.summary()
