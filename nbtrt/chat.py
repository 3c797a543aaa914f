"""Chat on top of the generation loop: chat templates, multi-turn history, the HF reference
for compare mode, and the ``nbtrt chat`` / ``nbtrt run`` commands.

A chat model was trained on conversations laid out in one exact format — for Qwen and
SmolLM2 that is ChatML::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant

``<|im_start|>`` and ``<|im_end|>`` are single control tokens. The format comes from the
tokenizer's own chat template; message text is tokenized as plain text, so a user who types
``<|im_end|>`` gets those characters, never a turn boundary.

>>> session = ChatSession(nbtrt.load("work/engine"), system="Answer briefly.")  # doctest: +SKIP
>>> for delta in session.send("What is a KV cache?"): print(delta, end="")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import sys
import threading
import weakref
from pathlib import Path
from typing import Iterator

from .chat_template import ROLES, apply_chat_template, check_messages  # noqa: F401  (nbtrt.chat's public names)
from .generate import GenerationError, GenerationStats, SamplingParams, check_text

class ChatSession:
    """A multi-turn conversation with an engine (or with :class:`HFReference`).

    ``send`` streams the answer and, when the stream ends (finished, stopped or abandoned),
    appends the user message and the answer so far to ``history``.

    >>> chat = ChatSession(engine, system="You are terse.", max_new_tokens=64)  # doctest: +SKIP
    >>> print("".join(chat.send("Name a colour.")))  # doctest: +SKIP
    >>> chat.history  # doctest: +SKIP
    [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'}]
    """

    def __init__(self, engine, system: str | None = None, **sampling):
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"system prompt must be a string, got {type(system).__name__}")
        self.engine = engine
        self.system = system or None
        self.sampling = sampling
        self.history: list[dict] = []
        self._answer = None  # weak reference to the answer being streamed (its generator)

    def messages(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return check_messages(system + self.history + [{"role": "user", "content": text}])

    def send(self, text: str, *, cancel: threading.Event | None = None, stats: GenerationStats | None = None,
             **sampling) -> Iterator[str]:
        """Stream the answer to ``text``. Bad input raises here and leaves the history unchanged."""
        check_text("a chat message", text)
        previous = self._answer() if self._answer is not None else None
        if previous is not None and previous.gi_frame is not None:  # neither finished nor closed
            # its user message and answer join the history only when it ends: sending now would
            # put this message before them
            raise GenerationError("the previous answer is still streaming: read it to the end or call .close() "
                                  "on it (or wait for it) before sending the next message")
        ids = apply_chat_template(self.engine.tokenizer, self.messages(text))
        options = {**self.sampling, **{k: v for k, v in sampling.items() if v is not None}}
        limits = getattr(self.engine, "limits", None)
        if limits is not None:
            limits.check_prompt(len(ids), "the conversation")
            # a long conversation leaves less room in the KV cache: answer shorter rather than fail
            wanted = self.engine.sampling(**options).max_new_tokens
            options["max_new_tokens"] = max(1, min(wanted, limits.room(len(ids))))
        deltas = self.engine.stream(ids, cancel=cancel, stats=stats, **options)
        answer = self._record(text, deltas)
        self._answer = weakref.ref(answer)
        return answer

    def _record(self, text: str, deltas: Iterator[str]) -> Iterator[str]:
        answer: list[str] = []
        try:
            for delta in deltas:
                answer.append(delta)
                yield delta
        finally:
            deltas.close()
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]

    def clear(self) -> None:
        self.history = []


class HFReference:
    """transformers' own ``model.generate``, streamed through ``TextIteratorStreamer`` in a
    thread: the reference side of compare mode, with the same ``stream`` contract as an Engine.

    >>> ref = HFReference(nbtrt.zoo.get("smollm2-135m-instruct"))  # doctest: +SKIP
    >>> "".join(ref.stream("The capital of France is", max_new_tokens=8))  # doctest: +SKIP
    """

    limits = None  # HF has no build-time limits

    def __init__(self, model_dir: str | Path, dtype: str = "float32"):
        import torch
        from ._io import load_hf_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.model = load_hf_model(self.model_dir, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = load_tokenizer(self.model_dir)
        path = self.model_dir / "generation_config.json"
        self.generation_config = json.loads(path.read_text()) if path.is_file() else {}

    def sampling(self, **overrides) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def stream(self, prompt: str | list[int], cancel: threading.Event | None = None,
               stats: GenerationStats | None = None, **sampling) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        p = self.sampling(**sampling)
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("prompt is empty")
        stats = stats or GenerationStats()
        done = threading.Event()  # ours: set when the consumer stops reading (never the caller's cancel)

        class Streamer(TextIteratorStreamer):
            def put(self, value):
                if not self.next_tokens_are_prompt:
                    stats.record(value.numel())
                super().put(value)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = done.is_set() or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        streamer = Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=not p.greedy, repetition_penalty=p.repetition_penalty,
                      eos_token_id=list(p.stop_token_ids) or None, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([Cancelled()]),
                      pad_token_id=self.generation_config.get("pad_token_id"))
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
        if p.stop_strings:
            kwargs.update(stop_strings=list(p.stop_strings), tokenizer=self.tokenizer)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        **kwargs)
            except BaseException as e:  # handed to the consumer below
                errors.append(e)
                streamer.end()

        def deltas() -> Iterator[str]:
            stats.begin(len(ids))
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                yield from (d for d in streamer if d)
            finally:
                done.set()  # stops the thread when the consumer walks away
                thread.join()
            if errors:
                raise errors[0]

        return deltas()


def reference_source(engine) -> Path | None:
    """The HF directory an engine was made from, following each stage's recorded source
    (engine -> checkpoint -> ... -> HF dir); None when that chain is broken."""
    path = Path(engine.manifest.get("checkpoint", {}).get("path", ""))
    for _ in range(8):
        config = path / "config.json"
        if not config.is_file():
            return None
        meta = json.loads(config.read_text()).get("nbtrt")
        if meta is None:
            return path
        path = Path(meta.get("source", ""))
    return None


# ---------------------------------------------------------------------------- CLI
def _add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generation_config.json, else 64")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")


def _sampling_from_args(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop_strings=a.stop)


def _load(engine_dir: str):
    from .engine import load

    return load(engine_dir)


def run_chat(a) -> None:
    """``nbtrt chat ENGINE_DIR``: a terminal chat. Ctrl-C stops the answer; Ctrl-D or /exit quits."""
    engine = _load(a.engine_dir)
    session = ChatSession(engine, system=a.system, **_sampling_from_args(a))
    print(f"{engine}\nCtrl-C stops an answer, /clear forgets the conversation, Ctrl-D or /exit quits.", flush=True)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/clear":
            session.clear()
            continue
        if not text.strip():
            continue
        stats, cancel = GenerationStats(), threading.Event()
        try:
            deltas = session.send(text, cancel=cancel, stats=stats)
        except GenerationError as e:
            print(f"error: {e}", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            for delta in deltas:
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            cancel.set()
            deltas.close()
            print(" [stopped]", end="")
        print(f"\n[{stats.summary()}]", flush=True)


def run_prompts(a) -> None:
    """``nbtrt run ENGINE_DIR --prompt ...``: one prompt streams; several run as one batch."""
    engine = _load(a.engine_dir)
    options = _sampling_from_args(a)
    prompts = a.prompt
    if a.chat:
        prompts = [apply_chat_template(engine.tokenizer, ([{"role": "system", "content": a.system}] if a.system else [])
                                       + [{"role": "user", "content": p}]) for p in prompts]
    stats = GenerationStats()
    if len(prompts) == 1:
        for delta in engine.stream(prompts[0], stats=stats, **options):
            print(delta, end="", flush=True)
        print()
    else:
        for i, text in enumerate(engine.generate(prompts, stats=stats, **options)):
            print(f"--- [{i}]\n{text}")
    print(f"[{stats.summary()}]", file=sys.stderr)


def add_cli(sub) -> None:
    p = sub.add_parser("chat", help="chat with an engine in the terminal (streaming; Ctrl-C stops the answer)")
    p.add_argument("engine_dir")
    _add_sampling_args(p)
    p.set_defaults(run=run_chat)
    p = sub.add_parser("run", help="generate from prompts with an engine (one prompt streams)")
    p.add_argument("engine_dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message in the chat template")
    _add_sampling_args(p)
    p.set_defaults(run=run_prompts)
