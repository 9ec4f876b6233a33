"""The one base class of the errors a user can fix. Imports nothing, so every layer (and the CLI's
parser, which stays light) may import it."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (a config key, a data file, a model name, the resources asked for, a
    run that stopped on purpose): its message says what happened and what to do. The CLI prints it as
    one line (exit 2), never a traceback; raised inside an actor, the driver re-raises it as itself
    (`raylign.workers.group.gather`). Every such error type of raylign derives from it."""
