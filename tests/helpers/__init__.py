"""Code the tests share (tests/README.md lists it): specs, sparsifier checks, docs pages, real services."""
