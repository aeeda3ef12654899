"""The one exception family the CLI turns into a clean message (no traceback) and exit code 2.

Raise a subclass wherever user input (a file, a config key, a study) is the cause, and say in the
message which file/study/key and what to do.
"""


class UserError(ValueError):
    """Bad input a user can fix; the message names it and says what to do."""
