"""The chat cell: ``nbtrt.widgets.Chat(engine)``.

ipywidgets handles a click only while no cell is running, so the answer is generated in a
worker thread: the widgets are shown from the main thread, the worker updates their values
as tokens arrive, and Stop sets a ``threading.Event`` that the generation loop checks before
every step. Compare mode streams the HF reference (``model.generate`` with
``TextIteratorStreamer``) next to the engine, for the same prompt.

Driven from code (tests, headless notebooks) the same way a person drives it::

    chat = Chat(engine)
    chat.input.value = "Hi!"
    chat.send_button.click()   # or chat.send("Hi!")
    chat.wait()
    chat.transcript()          # the markdown shown
"""
from __future__ import annotations

import html
import threading
import warnings
from pathlib import Path

import ipywidgets as w

from ..chat import ChatSession, HFReference, reference_source
from ..generate import GenerationError, GenerationStats


def _markdown(text: str) -> tuple[dict, ...]:
    return ({"output_type": "display_data", "data": {"text/markdown": text, "text/plain": text}, "metadata": {}},)


class _Pane:
    """One side of the chat: a title, the finished turns, the answer being streamed, its timing."""

    def __init__(self, title: str):
        self.turns: list[str] = []  # markdown of each finished turn
        self.answers: list[str] = []  # the assistant's text of each finished turn
        self.history = w.Output()
        self.live = w.Output()
        self.stats = w.HTML()
        self.box = w.VBox([w.HTML(f"<b>{title}</b>"), self.history, self.live, self.stats],
                          layout=w.Layout(flex="1 1 0", min_width="0", border="1px solid #ddd", padding="4px"))

    @staticmethod
    def turn(user: str, answer: str, note: str = "") -> str:
        return f"**You:** {user}\n\n**Assistant:** {answer}{note}"

    def show_live(self, markdown: str) -> None:
        self.live.outputs = _markdown(markdown) if markdown else ()

    def finish(self, answer: str, markdown: str) -> None:
        self.answers.append(answer)
        self.turns.append(markdown)
        self.history.outputs = _markdown("\n\n---\n\n".join(self.turns))
        self.live.outputs = ()

    def clear(self) -> None:
        self.turns, self.answers = [], []
        self.history.outputs = self.live.outputs = ()
        self.stats.value = ""

    def markdown(self) -> str:
        return "".join(o["data"]["text/markdown"] for out in (self.history, self.live) for o in out.outputs)


class Chat:
    """A chat with an engine in the notebook: markdown history, input box (Enter or Send), Stop
    (works while tokens stream), sampling sliders, live TTFT and tokens/s, Clear, and compare
    mode (the HF reference side by side; ``reference``: an HF directory, an :class:`HFReference`
    or another engine; default: the HF directory the engine was built from).

    >>> chat = Chat(nbtrt.load("work/engine"), system="Answer briefly.")  # doctest: +SKIP
    >>> chat  # doctest: +SKIP
    """

    def __init__(self, engine, *, reference=None, system: str | None = None, compare: bool = False, **sampling):
        self.engine = engine
        self.session = ChatSession(engine, system=system)
        self._reference = reference
        self._ref_session: ChatSession | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        p = engine.sampling(**sampling)
        limit = engine.limits.max_seq_len
        wanted = sampling.get("max_new_tokens") or 256
        self.temperature = w.FloatSlider(value=0.0 if p.greedy else p.temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature", tooltip="0 = greedy")
        self.top_k = w.IntSlider(value=p.top_k, min=0, max=200, description="top-k", tooltip="0 = off")
        self.top_p = w.FloatSlider(value=p.top_p, min=0.05, max=1.0, step=0.05, description="top-p")
        self.max_new_tokens = w.IntSlider(value=min(wanted, limit), min=1, max=min(2048, limit),
                                          description="max new tokens")
        self.input = w.Text(placeholder="Type a message; Enter sends", layout=w.Layout(flex="1 1 auto"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="trash")
        self.compare = w.Checkbox(value=compare, description="compare with the HF reference", indent=False)
        self.status = w.HTML()
        self.engine_pane = _Pane(f"engine ({engine.backend})")
        self.reference_pane = _Pane("HF reference (transformers generate)")
        self.send_button.on_click(self._on_send)
        self.stop_button.on_click(lambda _: self._cancel.set())
        self.clear_button.on_click(self._on_clear)
        self.compare.observe(lambda _: self._layout(), "value")
        with warnings.catch_warnings():  # ipywidgets 8 deprecates on_submit, but it is the only Enter-only hook
            warnings.simplefilter("ignore", DeprecationWarning)
            self.input.on_submit(self._on_send)
        self.panes = w.HBox([self.engine_pane.box, self.reference_pane.box])
        self.widget = w.VBox([
            self.panes,
            w.HBox([self.input, self.send_button, self.stop_button, self.clear_button]),
            w.HBox([self.temperature, self.top_k]), w.HBox([self.top_p, self.max_new_tokens]),
            w.HBox([self.compare, self.status]),
        ])
        self._layout()

    # ------------------------------------------------------------------ Python API
    def send(self, text: str) -> None:
        """Type ``text`` and press Send (returns at once; :meth:`wait` for the answer)."""
        self.input.value = text
        self.send_button.click()

    def stop(self) -> None:
        self.stop_button.click()

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

    def transcript(self, side: str = "engine") -> str:
        """The markdown rendered on one side (``"engine"`` or ``"reference"``)."""
        return self._pane(side).markdown()

    def last_answer(self, side: str = "engine") -> str | None:
        """The latest finished answer on one side (``"engine"`` or ``"reference"``)."""
        answers = self._pane(side).answers
        return answers[-1] if answers else None

    def _pane(self, side: str) -> _Pane:
        panes = {"engine": self.engine_pane, "reference": self.reference_pane}
        if side not in panes:
            raise ValueError(f"side must be 'engine' or 'reference', not {side!r}")
        return panes[side]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ handlers (main thread)
    def _layout(self) -> None:
        self.reference_pane.box.layout.display = "" if self.compare.value else "none"

    def _options(self) -> dict:
        return dict(temperature=self.temperature.value, top_k=self.top_k.value, top_p=self.top_p.value,
                    max_new_tokens=self.max_new_tokens.value)

    def _on_send(self, _=None) -> None:
        text = self.input.value
        if self.busy or not text.strip():
            return
        self._cancel = threading.Event()
        options = self._options()
        sides = [(self.engine_pane, self.session)]
        try:
            if self.compare.value:
                ref = self._reference_session()
                ref.history = list(self.session.history)  # the same prompt on both sides
                sides.append((self.reference_pane, ref))
            jobs = []
            for pane, session in sides:
                stats = GenerationStats()
                jobs.append((pane, text, stats, session.send(text, cancel=self._cancel, stats=stats, **options)))
        except (GenerationError, OSError, ValueError) as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        self.status.value = ""
        self.input.value = ""
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(jobs,), daemon=True)
        self._thread.start()

    def _on_clear(self, _=None) -> None:
        if self.busy:
            self._cancel.set()
            self.wait()
        self.session.clear()
        self.engine_pane.clear()
        self.reference_pane.clear()
        self.status.value = ""

    def _reference_session(self) -> ChatSession:
        if self._ref_session is None:
            ref = self._reference
            if ref is None:
                ref = reference_source(self.engine)
                if ref is None:
                    raise GenerationError("cannot find the HF model this engine was built from; "
                                          "pass Chat(engine, reference=HF_DIR)")
            if isinstance(ref, (str, Path)):
                self.status.value = "loading the HF reference…"
                ref = HFReference(ref)
            self._ref_session = ChatSession(ref, system=self.session.system)
        return self._ref_session

    # ------------------------------------------------------------------ worker threads
    def _run(self, jobs) -> None:
        threads = [threading.Thread(target=self._stream, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.send_button.disabled, self.stop_button.disabled = False, True

    def _stream(self, pane: _Pane, user: str, stats: GenerationStats, deltas) -> None:
        answer, note = "", ""
        try:
            for delta in deltas:
                answer += delta
                pane.show_live(pane.turn(user, answer + " ▌"))
                pane.stats.value = stats.summary()
        except Exception as e:  # shown in the pane; the engine is reset by its next request
            note = f"\n\n*error: {e}*"
        if self._cancel.is_set():
            note += " *[stopped]*"
        pane.stats.value = stats.summary()
        pane.finish(answer, pane.turn(user, answer, note))
