#!/usr/bin/env bash
# The documentation site (mkdocs.yml, docs/) builds with no warning: broken links, missing pages and
# API reference entries that no longer resolve all fail it. Needs the `docs` extra (in `test`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdocs build --strict --site-dir "$(mktemp -d)"
