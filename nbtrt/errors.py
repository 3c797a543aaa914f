"""Errors every layer shares, in a module that imports nothing (backends, chat and the generation
loop all raise them, so none has to import another just for the class)."""


class GenerationError(ValueError):
    """A request the engine cannot serve (too long, too many prompts, empty prompt, bad option)."""
