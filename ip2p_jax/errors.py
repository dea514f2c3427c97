"""The one base class of this project's own errors.

Every error that reports bad input or a bad setting (a file, a flag, a config key) derives from
`Ip2pError`; its message names what is wrong and where. The CLI catches only this class (exit 2,
one line); anything else is a genuine bug and keeps its traceback. It derives from ValueError so
that callers who caught ValueError before keep working.
"""


class Ip2pError(ValueError):
    """Bad input or settings, with a message that names the file, flag or key and the problem."""
