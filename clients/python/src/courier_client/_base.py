"""The root of this package's exceptions (apart so the codec stays standalone)."""


class CourierError(Exception):
    """The base of every error this package raises."""
