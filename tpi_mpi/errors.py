"""The error family the command line turns into one clear line (no traceback)."""


class TpiError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(TpiError):
    """A model or run setting tpi_mpi cannot honour."""


class ShardError(TpiError):
    """Prepared shards that are missing, stale or corrupt."""


class CommError(TpiError):
    """A rank that died, froze or broke the protocol; `ranks`: the ones named (empty: unknown)."""

    def __init__(self, message: str, ranks: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


class PeerFailed(TpiError):
    """Another rank failed and reports why itself; this one leaves quietly. `ranks`: which one."""

    def __init__(self, message: str, ranks: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
