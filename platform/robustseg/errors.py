"""Error types that always name the file or URI at fault and the problem."""
from __future__ import annotations

from typing import Optional


class RobustsegError(Exception):
    """Base class of all errors robustseg raises on purpose."""


class DataError(RobustsegError, ValueError):
    """Bad input data: ``"<where>: <problem>"``.

    Args:
        where: The file, URI or case id at fault.
        problem: What is wrong, in words a user can act on.
    """

    def __init__(self, where: object, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class StorageError(RobustsegError, OSError):
    """The object store could not be reached or written: names the URI."""

    def __init__(self, uri: str, problem: str, cause: Optional[BaseException] = None) -> None:
        self.uri = uri
        self.problem = problem
        msg = f"{uri}: {problem}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        super().__init__(msg)


class ConfigError(RobustsegError, ValueError):
    """Invalid configuration: names the key path and lists valid choices where known."""


class UnknownNameError(RobustsegError, KeyError):
    """An unknown registry or convention name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
