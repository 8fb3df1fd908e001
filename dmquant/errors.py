"""The one exception type users see for bad input: its message names the problem and the fix."""


class DMQuantError(ValueError):
    """Bad input or a state dmquant cannot work with. The CLI prints it on one line and exits 2."""
