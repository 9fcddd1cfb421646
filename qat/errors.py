"""The exception types of the project.

`UserError` and its subclasses are bad input from the user: their message is one line that names
the value or file and says what is allowed or what to do. The entry points print it as
`error: <message>` and exit with code 2. Any other exception is a bug (an internal invariant that
does not hold) and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (one-line message)."""


class ConfigError(UserError, ValueError):
    """A setting or argument that is not allowed: a config value, a bit-width, an option name."""


class DataError(UserError):
    """Data that cannot be used as it is: an unreadable WAV, a damaged cache or packed file, a folder
    that is not a finished run, a model whose weights are not finite."""


class TrainingError(UserError):
    """Training that cannot give a usable model with these settings: a loss or weights that are not
    finite (the learning rate is too high for the data)."""
