"""Chat templates: a conversation as the token ids the model was trained on, with message text kept
as plain text (a user who types ``<|im_end|>`` gets those characters, never a turn boundary).
A module of its own so the serving runtime and the chat front ends share it.

>>> ids = apply_chat_template(engine.tokenizer, [{"role": "user", "content": "Hi!"}])  # doctest: +SKIP
"""
from __future__ import annotations

import re
from collections import Counter

from .generate import GenerationError, check_text

ROLES = ("system", "user", "assistant")
_MARK = "\ue000{}\ue001"  # private-use characters: stand-ins for message text while the template renders
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def check_messages(messages: list[dict], *, for_generation: bool = True) -> list[dict]:
    """Validate a conversation: ``{"role", "content"}`` dicts, an optional system message first,
    then user and assistant alternating, starting with user (and, to generate, ending with user).

    >>> check_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise GenerationError(f"message {i} has role {m.get('role')!r}; roles are 'system' (first message only), "
                                  "'user' and 'assistant'")
        if not isinstance(m.get("content"), str):
            raise GenerationError(f"message {i} ({m['role']}) content must be a string, "
                                  f"got {type(m.get('content')).__name__}")
        check_text(f"message {i} ({m['role']}) content", m["content"])
    offset = 1 if messages[0]["role"] == "system" else 0
    for j, m in enumerate(messages[offset:]):
        want = ("user", "assistant")[j % 2]
        if m["role"] != want:
            raise GenerationError(f"message {j + offset} should be a {want!r} message, not {m['role']!r}: after an "
                                  "optional first system message, user and assistant alternate, starting with user")
        if want == "user" and not m["content"].strip():
            raise GenerationError(f"message {j + offset} (user) is empty")
    if for_generation and messages[-1]["role"] != "user":
        raise GenerationError("the last message must be the user's (the model answers it)")
    return [dict(m) for m in messages]


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, where message text can never
    become a control token. When the text holds nothing that looks like one, the ids are exactly
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``; otherwise the template
    is rendered around stand-ins, its own text tokenized normally (``<|im_start|>`` is one token)
    and each message's text with special tokens split (a typed ``<|im_end|>`` stays text).

    >>> ids = apply_chat_template(engine.tokenizer, [{"role": "user", "content": "Hi!"}])  # doctest: +SKIP
    """
    messages = check_messages(messages, for_generation=add_generation_prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this tokenizer has no chat template (a base model?); use engine.generate or "
                              "engine.stream with plain text instead of chat")

    def render(msgs: list[dict]) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(text: str, **kw) -> list[int]:
        return tokenizer(text, add_special_tokens=False, **kw)["input_ids"] if text else []

    control = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    marked = render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)])
    ids = encode(render(messages))
    if Counter(t for t in ids if t in control) == Counter(t for t in encode(marked) if t in control):
        return ids  # every control token came from the template itself
    pieces = _MARK_RE.split(marked)  # template text, message index, template text, ...
    if [int(i) for i in pieces[1::2]] != list(range(len(messages))):
        raise GenerationError("message text contains control tokens and this chat template rewrites message "
                              "text, so the two cannot be kept apart; remove them from the messages")
    return [t for k, piece in enumerate(pieces)
            for t in (encode(messages[int(piece)]["content"], split_special_tokens=True) if k % 2 else encode(piece))]
