#!/bin/sh
# Frame each line of the file named by $1.
sed 's/^/| /' "$1"
echo "| built $(date -u +%Y-%m-%d)"
