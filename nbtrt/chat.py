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
import time
import weakref
from pathlib import Path
from typing import Iterator

from ._io import recorded_source
from .chat_template import ROLES, apply_chat_template, check_messages  # noqa: F401  (nbtrt.chat's public names)
from .generate import GenerationError, GenerationState, GenerationStats, SamplingParams, check_text
from .transcript import Reply, finish_reason

# `nbtrt chat`'s default answer length: long enough not to cut an ordinary answer short (the
# engine's room caps it, and an answer that hits the cap ends with "[length limit]")
CHAT_MAX_NEW_TOKENS = 512


class ChatSession:
    """A multi-turn conversation with an engine (or with :class:`HFReference`).

    ``send`` streams the answer and, when the stream ends (finished, stopped or abandoned),
    appends the user message and the answer so far to ``history`` and its :class:`Reply` (token
    ids, how it ended, timing) to ``replies``. ``undo`` takes the last turn back.

    >>> chat = ChatSession(engine, system="You are terse.", max_new_tokens=64)  # doctest: +SKIP
    >>> print("".join(chat.send("Name a colour.")))  # doctest: +SKIP
    >>> chat.history  # doctest: +SKIP
    [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'}]
    >>> chat.replies[-1].finish, chat.replies[-1].summary()  # doctest: +SKIP
    ('stop', '3 tokens · TTFT 41 ms · 52.0 tokens/s')
    """

    def __init__(self, engine, system: str | None = None, **sampling):
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"system prompt must be a string, got {type(system).__name__}")
        self.engine = engine
        self.system = system or None
        self.sampling = sampling
        self.history: list[dict] = []
        self.replies: list[Reply] = []  # one per assistant message of history
        self.reply: Reply | None = None  # the latest answer, filled in while it streams
        self._answer = None  # weak reference to the answer being streamed (its generator)

    def messages(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return check_messages(system + self.history + [{"role": "user", "content": text}])

    @property
    def streaming(self) -> bool:
        """True while an answer is neither finished nor closed."""
        previous = self._answer() if self._answer is not None else None
        return previous is not None and previous.gi_frame is not None

    def _check_idle(self, doing: str) -> None:
        if self.streaming:
            # its user message and answer join the history only when it ends: acting now would
            # put this change before them
            raise GenerationError(f"the previous answer is still streaming: read it to the end or call .close() "
                                  f"on it (or wait for it) before {doing}")

    def send(self, text: str, *, cancel: threading.Event | None = None, stats: GenerationStats | None = None,
             **sampling) -> Iterator[str]:
        """Stream the answer to ``text``. Bad input raises here and leaves the history unchanged."""
        check_text("a chat message", text)
        self._check_idle("sending the next message")
        ids = apply_chat_template(self.engine.tokenizer, self.messages(text))
        options = {**self.sampling, **{k: v for k, v in sampling.items() if v is not None}}
        limits = getattr(self.engine, "limits", None)
        if limits is not None:
            limits.check_prompt(len(ids), "the conversation")
            # a long conversation leaves less room in the KV cache: answer shorter rather than fail
            wanted = self.engine.sampling(**options).max_new_tokens
            options["max_new_tokens"] = max(1, min(wanted, limits.room(len(ids))))
        params = self.engine.sampling(**options)  # the one place options are checked
        cancel = cancel or threading.Event()  # ours when the caller has none: Stop is read from it
        state = GenerationState([ids], stats=stats or GenerationStats())
        deltas = self.engine.stream(ids, cancel=cancel, state=state, **options)
        self.reply = Reply(stats=state.stats, max_new_tokens=params.max_new_tokens)
        answer = self._record(text, deltas, self.reply, state, params, cancel)
        self._answer = weakref.ref(answer)
        return answer

    def _record(self, text: str, deltas: Iterator[str], reply: Reply, state: GenerationState,
                params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        closed = False
        try:
            for delta in deltas:
                reply.text += delta
                yield delta
        except GeneratorExit:  # the reader walked away (closed or dropped the stream): a stop
            closed = True
            raise
        except Exception as e:
            reply.finish, reply.error = "error", str(e)
            raise
        finally:
            deltas.close()
            reply.token_ids = list(state.tokens[0]) if state.tokens else []
            if reply.finish is None:
                reply.finish = finish_reason(reply.token_ids, params.stop_token_ids, params.max_new_tokens,
                                             stopped=closed or cancel.is_set(),
                                             ended_by_model=bool(state.finished and state.finished[0]))
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
            self.replies.append(reply)

    @property
    def turns(self) -> list[tuple[str, Reply]]:
        """(user message, reply) per turn; a reply stands in with the text alone where ``history``
        was edited by hand."""
        users = [m["content"] for m in self.history if m["role"] == "user"]
        answers = [m["content"] for m in self.history if m["role"] == "assistant"]
        replies = self.replies
        if [r.text for r in replies] != answers:
            replies = [Reply(text=a) for a in answers]
        return list(zip(users, replies))

    def undo(self) -> str | None:
        """Take the last turn back; return its user message (None when there is no turn)."""
        self._check_idle("undoing a turn")
        if len(self.history) < 2:
            return None
        user = self.history[-2]["content"]
        del self.history[-2:]
        if self.replies:
            self.replies.pop()
        return user

    def context_tokens(self) -> int:
        """Tokens the conversation so far (system prompt and history, in the chat template) takes
        of the next prompt; the next message adds its own. Compare with ``engine.limits.max_input_len``."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        if not messages:
            return 0
        return len(apply_chat_template(self.engine.tokenizer, messages, add_generation_prompt=False))

    def clear(self) -> None:
        self._check_idle("clearing the conversation")
        self.history, self.replies, self.reply = [], [], None


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
               stats: GenerationStats | None = None, state: GenerationState | None = None,
               **sampling) -> Iterator[str]:
        """Yield text deltas as HF generates; ``state`` (optional) receives the new token ids in
        ``state.tokens[0]`` and ``state.stats`` the timing, as the engine's loop fills them."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        p = self.sampling(**sampling)
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("prompt is empty")
        state = state or GenerationState([ids], stats=stats or GenerationStats())
        stats = state.stats
        state.tokens, state.finished = [[]], [False]
        done = threading.Event()  # ours: set when the consumer stops reading (never the caller's cancel)

        class Streamer(TextIteratorStreamer):
            def put(self, value):
                if not self.next_tokens_are_prompt:
                    state.tokens[0].extend(value.flatten().tolist())
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
                if p.seed is not None:  # HF draws from torch's global generator
                    torch.manual_seed(p.seed)
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
    return recorded_source(Path(engine.manifest.get("checkpoint", {}).get("path", "")))


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


def _load(engine_dir: str, max_batch_size: int = 1):
    """An ``nbtrt.LLM`` over the engine directory: the loop the server runs (in-flight batching on a
    torch engine, static batches elsewhere), with a KV cache for ``max_batch_size`` sequences only."""
    from .serving.llm import LLM

    return LLM(engine_dir, max_batch_size=max_batch_size, verbose=False)


def _line_editing() -> None:
    """Arrow keys, Ctrl-A/E, and the up arrow for earlier messages at the ``you>`` prompt: importing
    readline (stdlib; absent on Windows, where the console edits lines itself) hooks it into input()."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def run_chat(a) -> None:
    """``nbtrt chat ENGINE_DIR``: a terminal chat with line editing and history. Ctrl-C stops an
    answer (at the prompt it clears the line); Ctrl-D or /exit quits; /undo, /clear, /export PATH."""
    _line_editing()
    engine = _load(a.engine_dir)  # an nbtrt.LLM: the serving loop, one conversation at a time
    options = _sampling_from_args(a)
    if options["max_new_tokens"] is None:
        options["max_new_tokens"] = CHAT_MAX_NEW_TOKENS
    session = ChatSession(engine, system=a.system, **options)
    limits = engine.limits
    print(f"{engine}\nanswers up to {options['max_new_tokens']} tokens (--max-new-tokens), the conversation up to "
          f"max_input_len={limits.max_input_len}.\nCtrl-C stops an answer, /undo takes the last turn back, "
          "/clear forgets the conversation, /export PATH writes it, Ctrl-D or /exit quits.", flush=True)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # clears the line, as a shell does; quitting is Ctrl-D
            print("\n(Ctrl-D or /exit quits)", flush=True)
            continue
        if _command(session, text, engine):
            if text.strip() in ("/exit", "/quit"):
                return
            continue
        if not text.strip():
            continue
        try:
            _answer(session, text)
        except KeyboardInterrupt:  # between the answer's end and the prompt: nothing to stop
            print(flush=True)


def _command(session: ChatSession, text: str, engine) -> bool:
    """Run a /command; False when ``text`` is a message."""
    from .transcript import export

    word, _, arg = text.strip().partition(" ")
    if word in ("/exit", "/quit"):
        return True
    if word == "/clear":
        session.clear()
        print("(conversation cleared)", flush=True)
    elif word == "/undo":
        user = session.undo()
        print(f"(took back: {user!r})" if user is not None else "(nothing to undo)", flush=True)
    elif word == "/export":
        stem = arg.strip() or time.strftime("chat-%Y%m%d-%H%M%S")
        try:
            paths = export(stem, session.turns, system=session.system, info={"engine": str(engine.engine_dir)})
        except (OSError, ValueError) as e:
            print(f"error: cannot export to {stem!r}: {e}", flush=True)
        else:
            print("(wrote " + " and ".join(str(p.resolve()) for p in paths) + ")", flush=True)
    else:
        return False
    return True


def _answer(session: ChatSession, text: str) -> None:
    stats, cancel = GenerationStats(), threading.Event()
    try:
        deltas = session.send(text, cancel=cancel, stats=stats)
    except GenerationError as e:
        print(f"error: {e}", flush=True)
        return
    print("assistant> ", end="", flush=True)
    try:
        for delta in deltas:
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        cancel.set()
        deltas.close()
    except GenerationError as e:
        print(f"\nerror: {e}", end="")
    reply = session.reply
    marker = reply.marker or ("[stopped]" if cancel.is_set() else "")
    marker = f" {marker}" if marker else ""
    print(f"{marker}\n[{stats.summary()}]", flush=True)


def run_prompts(a) -> None:
    """``nbtrt run ENGINE_DIR --prompt ...``: one prompt streams; several are served together."""
    prompts = a.prompt
    for i, p in enumerate(prompts):  # before the engine loads: a typo costs no wait
        check_text(f"prompt {i}", p)
        if not p:
            raise GenerationError("prompt is empty" + (f" (--prompt number {i + 1})" if len(prompts) > 1 else ""))
    llm = _load(a.engine_dir, max_batch_size=min(len(prompts), 8))
    options = _sampling_from_args(a)
    if a.chat:
        prompts = [apply_chat_template(llm.tokenizer, ([{"role": "system", "content": a.system}] if a.system else [])
                                       + [{"role": "user", "content": p}]) for p in prompts]
    if len(prompts) == 1:
        stats = GenerationStats()
        for delta in llm.stream(prompts[0], stats=stats, **options):
            print(delta, end="", flush=True)
        print()
        print(f"[{stats.summary()}]", file=sys.stderr)
        return
    start = time.perf_counter()
    outs = llm.generate(prompts, llm.sampling(**options), use_tqdm=False)
    for i, out in enumerate(outs):
        print(f"--- [{i}]\n{out.text}")
    tokens, wall = sum(len(o.token_ids) for o in outs), time.perf_counter() - start
    ttft = sorted(o.metrics["ttft_s"] or 0.0 for o in outs)[len(outs) // 2]
    print(f"[{len(outs)} prompts, {tokens} tokens · TTFT median {1e3 * ttft:.0f} ms · {tokens / wall:.1f} tokens/s]",
          file=sys.stderr)


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
