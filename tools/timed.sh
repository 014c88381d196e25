#!/bin/sh
# Usage: tools/timed.sh LABEL COMMAND [ARG...]
# Runs COMMAND and prints how long it took, so a first `make run` shows its
# progress step by step (the Makefile's install steps all go through here).
label=$1
shift
start=$(date +%s)
echo "make: $label ..."
"$@"
status=$?
elapsed=$(( $(date +%s) - start ))
if [ "$status" -eq 0 ]; then
  echo "make: $label: done in $(( elapsed / 60 )) min $(( elapsed % 60 )) s"
else
  echo "make: $label: FAILED (status $status) after $(( elapsed / 60 )) min $(( elapsed % 60 )) s" >&2
fi
exit "$status"
