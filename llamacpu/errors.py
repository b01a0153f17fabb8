"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class LlamacpuError(Exception):
    """Bad input: a missing or corrupt file, an unsupported model, an invalid setting.

    The message is one line meant for the user; the CLI prints it without a traceback.
    """


def reason(e: BaseException) -> str:
    """A one-line account of an unexpected exception, in words rather than its class name."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, ZeroDivisionError):
        return "a size or count is zero where it must not be"
    if isinstance(e, KeyError):
        return f"the entry {e.args[0]!r} is missing" if e.args else "an entry is missing"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = " ".join(str(e).split())
    return text or "an unexpected value"


def is_rust_panic(e: BaseException) -> bool:
    """pyo3's PanicException (a Rust panic inside `tokenizers`): a BaseException, not an Exception."""
    return type(e).__name__ == "PanicException"
