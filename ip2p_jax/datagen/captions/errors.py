"""The one error type of the caption stage: bad input, a missing model, a failing endpoint."""

from ip2p_jax.errors import Ip2pError


class CaptionStageError(Ip2pError):
    """A problem the user must fix; the message names the file, item or endpoint."""


class BackendError(CaptionStageError):
    """A language-model backend could not be loaded or did not answer usefully."""
