"""Errors a user can cause, each saying what happened and what to do."""


class AggBoxError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class SetupError(AggBoxError):
    """The machine lacks something (root, a kernel feature, a package)."""


class TestbedError(AggBoxError):
    """A testbed could not be brought up, used or torn down."""


class VerifierError(AggBoxError):
    """The kernel refused an eBPF program; the message names it and shows the log tail."""


class CollectiveTimeout(AggBoxError):
    """A collective did not complete in time; ``missing`` names the members that did not answer."""

    def __init__(self, message: str, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = missing or []
