"""The one error type of the checkpoint readers."""


class WeightsError(ValueError):
    """A checkpoint cannot be read; the message names the file and the field or tensor at fault."""
