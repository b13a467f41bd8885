"""The one error type of program loading: the reason an archive is refused, without a field name
(the upload route names the body, a job names model.program)."""

from __future__ import annotations


class ProgramError(ValueError):
    """A `.pt2` archive that is unsafe to load, or a program the service cannot train; the message says why."""
