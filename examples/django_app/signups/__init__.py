"""A Django app that starts pgflow runs from a view and serves them with a management command."""
