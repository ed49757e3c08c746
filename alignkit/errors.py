"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a single line on stderr and exit status 2, no traceback.
Raise it with the what and the where (file, line, key) in the message.
"""


class UserError(Exception):
    """Bad input: a missing file, a malformed line, an unknown key, a bad value."""


class TrainingDiverged(RuntimeError):
    """A loss, gradient or reward became NaN/inf; the stage stops and stays incomplete."""
