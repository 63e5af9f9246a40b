"""The todo application's `todo` service, in Python."""
