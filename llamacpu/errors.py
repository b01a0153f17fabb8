"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class LlamacpuError(Exception):
    """Bad input: a missing or corrupt file, an unsupported model, an invalid setting.

    The message is one line meant for the user; the CLI prints it without a traceback.
    """
