"""The error of a constraint the request got wrong."""

from __future__ import annotations


class StructuredOutputError(ValueError):
    """A constraint that is malformed, cannot be compiled or is not supported: the request's
    fault (400). `param` names the request field."""

    def __init__(self, message: str, param: str = "structured_outputs") -> None:
        super().__init__(message)
        self.param = param
