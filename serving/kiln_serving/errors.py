"""Domain errors of the server, and the one table of what each is in HTTP and in gRPC (app.py and
grpc_service.py read it; nothing else knows either protocol)."""


class ServingError(Exception):
    """Base of every error a client can cause or see; the message is shown to the client as is, but for text that
    is not Unicode, written as its escape: a lone surrogate (a JSON \\ud800 makes one) quoted from a request would
    leave the answer impossible to encode."""

    def __init__(self, message: str) -> None:
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8"))


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


class UnsupportedMediaType(ServingError):
    """The body is in a format this endpoint does not take (HTTP 415)."""


class ClientClosed(ServingError):
    """The client hung up before the answer; nobody is left to tell (counted, never logged as an error)."""


# error -> (HTTP status, gRPC status code name); the first matching class wins, ServingError last.
STATUS: dict[type[ServingError], tuple[int, str]] = {
    InvalidInput: (400, "INVALID_ARGUMENT"),
    ModelNotFound: (404, "NOT_FOUND"),
    PayloadTooLarge: (413, "RESOURCE_EXHAUSTED"),
    UnsupportedMediaType: (415, "INVALID_ARGUMENT"),
    ServerBusy: (503, "UNAVAILABLE"),  # as Triton answers a full queue: the code gRPC clients retry
    ModelNotReady: (503, "UNAVAILABLE"),
    ClientClosed: (499, "CANCELLED"),
    ServingError: (500, "INTERNAL"),
}


def status(err: ServingError) -> tuple[int, str]:
    """The HTTP status and gRPC code of an error."""
    return next(codes for kind, codes in STATUS.items() if isinstance(err, kind))
