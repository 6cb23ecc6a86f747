"""One exception type for every user-facing problem: its message is one line naming the problem and
the fix; the CLI prints it and exits with status 2."""


class BinaryLLMError(RuntimeError):
    pass
