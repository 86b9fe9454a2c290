"""Error types shared by every role; the router maps them to OpenAI error JSON."""


class NanoPDError(Exception):
    """Base class of the errors this project raises on purpose."""


class InvalidRequestError(NanoPDError, ValueError):
    """The caller's input is wrong (a 4xx in the server)."""


class ModelLoadError(NanoPDError):
    """The model cannot be found or is not supported."""
