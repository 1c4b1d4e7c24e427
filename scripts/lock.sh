#!/usr/bin/env bash
# Regenerate requirements/lock.txt (the exact pins CI and scripts/setup.sh install) from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra cpu --extra dynamo --extra dist --extra nixl --extra bench --extra model --extra test \
  --override requirements/overrides.txt --find-links /opt/wheels --index-strategy unsafe-best-match \
  --python-version 3.11 --no-header --no-annotate -o requirements/lock.txt
