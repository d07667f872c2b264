"""Engine errors: each says which field was wrong and why.

The HTTP layer maps each class to one status code; the engine itself knows
nothing of HTTP.
"""

from __future__ import annotations


class FedHubError(Exception):
    """Base class: a refusal with a human message and, where it applies, the field at fault."""

    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"error": self.code, "field": self.field, "message": self.message}

    def within(self, where: str) -> FedHubError:
        """The same refusal of a part of a larger body: field and message under ``where``
        (``devices[2]`` + ``name`` -> ``devices[2].name``)."""
        field = f"{where}.{self.field}" if self.field and self.field != "body" else where
        return type(self)(f"{field}: {self.message}", field)


class InvalidInput(FedHubError):
    """The request's content is malformed or inconsistent with the model."""

    code = "invalid_input"


class TooLarge(InvalidInput):
    """The body is larger than the configured limit."""

    code = "too_large"


class Unauthorized(FedHubError):
    """No credentials, or credentials nobody issued."""

    code = "unauthorized"


class Forbidden(FedHubError):
    """Valid credentials that do not allow this call."""

    code = "forbidden"


class NotFound(FedHubError):
    code = "not_found"


class Conflict(FedHubError):
    """The call is well formed but the federation's state does not allow it now
    (a closed round, a device not selected, an update already counted)."""

    code = "conflict"


class RunMismatch(FedHubError, ValueError):
    """The state directory holds a run that these settings cannot continue (one that used
    differential privacy, without the same DP settings or its accountant's state): the server
    does not start, and the message says how to start a new run instead. A ValueError too, so
    that every command line reports it as its one ``error:`` line."""

    code = "run_mismatch"


class RunOver(FedHubError):
    """The strategy ends the run before the next round (a spent privacy budget): the driver
    marks the run finished with this message as the reason."""

    code = "run_over"
