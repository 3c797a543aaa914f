"""Errors every layer shares, in a module that imports nothing (backends, chat and the generation
loop all raise them, so none has to import another just for the class)."""
import numbers


class GenerationError(ValueError):
    """A request the engine cannot serve (too long, too many prompts, empty prompt, bad option)."""


def is_whole(value, minimum: int | None = None, maximum: int | None = None) -> bool:
    """An integer (not a bool, not 2.0) within the bounds given: the test behind every size option.

    >>> is_whole(8, 1), is_whole(0, 1), is_whole(True, 0), is_whole(2.0, 1)
    (True, False, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
