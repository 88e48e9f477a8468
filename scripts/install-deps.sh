#!/usr/bin/env bash
# System packages the tests and demos use. Safe to run again: installs only what is missing.
set -euo pipefail
need=()
command -v node >/dev/null || { echo "install-deps: Node.js 20+ is required" >&2; exit 1; }
[ ${#need[@]} -eq 0 ] && exit 0
