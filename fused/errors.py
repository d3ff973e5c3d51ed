"""The errors a request can end in, one hierarchy for the whole core.

A `TetherError` is a request that cannot be done, said in one line for the
user; control.py answers it as a protocol error. Anything else that escapes a
request is a bug: logged with its traceback and answered as "internal error".
Pure: imports nothing, so every layer can raise these.
"""
from __future__ import annotations


class TetherError(Exception):
    """A request that cannot be done; the message names the cause and the fix."""


class InputError(TetherError, ValueError):
    """Bad input from a user: an annotation, a name, a CLI argument, a request.

    Also a ValueError, as it always was: callers that parse catch that.
    """


class ConfigError(TetherError):
    """The configuration file cannot be read or does not validate."""


class StoreError(TetherError):
    """The store refuses the change or cannot be used (locked, damaged, too new)."""


class StoreFull(StoreError):
    """No space is left where the store writes (a full disk under state_dir,
    etcd's quota): an expected condition, refused in one line, nothing changed."""


class DeadlineError(TetherError):
    """A change could not reach its commit in time (it waited for the store,
    the kernel or an earlier change): refused, nothing changed."""


class WiringError(TetherError):
    """The kernel refused a piece of a container's network (veth, address, route)."""


class FirewallError(TetherError):
    """The configured firewall driver cannot work on this host."""


class ServiceError(TetherError):
    """A well-formed request the current state does not allow (no such
    container, a running container to remove, a process already gone)."""
