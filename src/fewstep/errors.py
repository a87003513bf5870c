"""User-facing errors: the CLI prints these as one line on stderr and exits non-zero."""


class FewstepError(Exception):
    """A problem with the user's input (a path, a value, a file), with a message that says what to do."""


class TrainingDiverged(FewstepError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""
