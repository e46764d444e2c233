#!/usr/bin/env bash
# Kept for compatibility: the project command is regen.sh (writes <repo>/tests/fixtures). Usage: bash run_all.sh [--bench]
exec bash "$(dirname "${BASH_SOURCE[0]}")/regen.sh" "$@"
