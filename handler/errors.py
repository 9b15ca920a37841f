"""Per-request errors: each carries the HTTP status, an OpenAI-style type and a short code.

The handler catches RequestError for one request of a batch and answers it alone with
`status` and `formats.error_body(err)`; the other requests of the batch go on.
"""


class RequestError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str = None, status: int = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class InvalidAudio(RequestError):
    """The upload is not usable audio: empty, undecodable, no samples, NaN/inf samples."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)


class AudioTooLong(RequestError):
    status = 413
    type = "invalid_request_error"
    code = "audio_too_long"


class UnsupportedMediaType(RequestError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class InvalidOption(RequestError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_option"

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


class ModelNotLoaded(RequestError):
    status = 400
    type = "invalid_request_error"
    code = "model_not_found"


class OutOfMemory(RequestError):
    status = 507
    type = "server_error"
    code = "out_of_memory"


class InternalError(RequestError):
    status = 500
    type = "server_error"
    code = "internal_error"


class Overloaded(RequestError):
    """More audio is in flight than the engine admits: retry after `retry_after` seconds."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Draining(Overloaded):
    """The server is stopping: it finishes the requests in flight and takes no new ones."""

    code = "draining"
