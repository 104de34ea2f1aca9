"""User-facing errors.

Anything a user can cause (a bad path, a misspelled field, data that is too short) raises
``LowbitError`` with a message that says what was wrong and what to do. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input or environment, explained in the message."""
