"""One error type for everything a user can get wrong, so CLIs can print it plainly."""


class PolicyError(ValueError):
    """Bad input a person must fix: the message names the file, key or column and the rule."""
