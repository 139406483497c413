"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input, a missing file, a failed download: something the user can fix.

    Subclasses name the file and the problem in their message.
    """
