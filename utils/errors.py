"""The one exception type the command line turns into a clear message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: the message names the input and the fix."""
