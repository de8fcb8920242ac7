"""The one exception type a user sees: a sentence saying what is wrong and what to do."""


class WorkbookError(Exception):
    """Bad input or a machine that cannot do what was asked; the message is the whole story."""
