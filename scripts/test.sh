#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, real-data checks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report and demo page tests drive a real headless Chromium (Debian package
# `chromium`; the page test through Playwright, which uses this browser, never downloads one).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the browser tests will fail" >&2
fi
# The shared-study test of `cifar100 tune --storage` starts a real PostgreSQL server (Debian
# package `postgresql`; the test runs it on 127.0.0.1 in a temporary folder).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null \
  && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
    || echo "warning: could not install postgresql; the shared-study test will fail" >&2
fi
export CIFAR100_SHARED="${CIFAR100_SHARED:-$(cd .. && pwd)/shared}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
# The documentation site (mkdocs.yml): any broken link, missing page or unknown anchor fails.
site_dir="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site_dir"
rm -rf "$site_dir"
.venv/bin/python -m pytest -q "$@"
