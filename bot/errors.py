"""The bot's error hierarchy: each error carries a message a user can act on and an exit code.

Skips (a candidate the bot decides not to process) are data, not exceptions; these are for
inputs the bot cannot work with and for failures it cannot recover from.
"""


class SafeguardError(Exception):
    """Base of every error the bot raises on purpose.

    `transient`: worth trying again later (an outage, a rate limit, a full disk); the ledger
    queues the candidate again with a wait instead of counting a failed attempt.
    """

    exit_code = 1
    transient = False


class UsageError(SafeguardError):
    """A bad argument or option value."""

    exit_code = 2


class InputNotFoundError(SafeguardError):
    """A model directory, file or Hub repository that does not exist."""

    exit_code = 3


class CheckpointError(SafeguardError):
    """A checkpoint that cannot be read: corrupt, truncated, a broken index, unknown dtype."""

    exit_code = 4


class PickleRefusedError(CheckpointError):
    """Only pickle weights (.bin/.pt) were found, and pickle was not allowed."""


class IncompatibleModelsError(SafeguardError):
    """Base and fine-tune cannot be merged: architecture, tensor names or shapes differ."""

    exit_code = 5


class MergeError(SafeguardError):
    """The merge itself failed, e.g. it produced NaN or Inf."""

    exit_code = 6


class HubError(SafeguardError):
    """The Hub refused or failed a request (auth, missing repo or revision, network)."""

    exit_code = 7


class TransientHubError(HubError):
    """The Hub failed for a while: 429, 5xx, a timeout or a dropped connection, after the
    retries. Never a decision about a repo."""

    transient = True


class GoneError(InputNotFoundError):
    """A repo or revision the Hub no longer has (deleted, or private now)."""


class DiskSpaceError(SafeguardError):
    """Not enough free disk for a candidate's download and merge (yet)."""

    exit_code = 10
    transient = True


class OutputExistsError(SafeguardError):
    """The output path exists and overwriting was not asked for."""

    exit_code = 8


class LedgerError(SafeguardError):
    """The ledger cannot be opened or written, or a claim on an entry was lost."""

    exit_code = 9
