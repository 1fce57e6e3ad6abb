"""The one exception type the command line turns into a clear message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: the message names the input and the fix."""


class ConfigError(UserError):
    """Flag values that cannot work; the message lists each with the flag and the fix."""


def format_problems(problems: list[str]) -> str:
    """Several problems as one message: a header line, then one indented line each."""
    return "\n".join(["invalid arguments:", *(f"  - {p}" for p in problems)])
