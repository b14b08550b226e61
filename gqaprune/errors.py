"""User-facing errors: one clear message and an exit code, never a bare traceback."""


class GqaError(Exception):
    """An error the CLI prints as one message. exit_code 2 = bad input, 1 = failed run."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(GqaError):
    """Bad recipe, adapter, model folder or data source (exit 2, nothing written)."""

    exit_code = 2


class CheckFailed(GqaError):
    """A run-time check failed: round trip, NaN/inf, verification (exit 1)."""

    exit_code = 1


class GateFailed(GqaError):
    """A quality gate failed; the output folder is still written (exit 3)."""

    exit_code = 3
