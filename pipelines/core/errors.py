"""Errors a person can act on. Each carries the process exit code the CLI uses for it.

Exit codes: 1 unexpected failure, 2 bad input or configuration, 3 the data gate stopped the run,
4 training diverged, 6 a version failed its smoke test (it may not serve). The flow retries only failures that may be transient (code 1).
"""


class TrainpipeError(Exception):
    """A failure with a one-line message for the user."""

    exit_code = 1


class ConfigError(TrainpipeError):
    """params.yaml, an override or a command-line argument is wrong."""

    exit_code = 2


class SourceError(TrainpipeError):
    """The data source is missing, unreadable or empty."""

    exit_code = 2


class GateError(TrainpipeError):
    """A blocking data-quality check failed; training must not start."""

    exit_code = 3


class DivergenceError(TrainpipeError):
    """Training produced a non-finite loss; no model is written."""

    exit_code = 4


class ChampionMovedError(TrainpipeError):
    """@champion moved to another version between the read a move was decided on and the move."""

    def __init__(self, message: str, expected: str | None, found: str | None):
        super().__init__(message)
        self.expected, self.found = expected, found


class SmokeTestError(TrainpipeError):
    """A version failed to load or to answer its smoke test: it must not become champion."""

    exit_code = 6


# Exit codes that mean "retrying will not help": bad input, a failed gate, a diverged run.
PERMANENT_EXIT_CODES = frozenset(
    {ConfigError.exit_code, GateError.exit_code, DivergenceError.exit_code, SmokeTestError.exit_code}
)
