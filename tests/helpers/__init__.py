"""Helpers the tests share: real services (helpers.service), an API process, podman compose, old schemas."""
