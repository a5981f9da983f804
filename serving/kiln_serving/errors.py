"""Domain errors of the server. app.py maps each to an HTTP status in one place; nothing below it knows HTTP."""


class ServingError(Exception):
    """Base of every error a client can cause or see; the message is shown to the client as is."""


class InvalidInput(ServingError):
    """The request is malformed or does not fit the model's inputs (HTTP 400)."""


class ModelNotFound(ServingError):
    """No such model or version on this server (HTTP 404)."""


class ModelNotReady(ServingError):
    """The model is loading, failed to load or the server is shutting down (HTTP 503)."""


class PayloadTooLarge(ServingError):
    """The request body is over the configured limit (HTTP 413)."""


class ServerBusy(ServingError):
    """The request queue is full: back off and retry (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class InferenceFailed(ServingError):
    """The runtime failed on a request that passed validation (HTTP 500)."""
