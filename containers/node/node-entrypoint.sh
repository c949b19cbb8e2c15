#!/bin/sh
# Provision on first start (keys, the peer directory from the exchange folder, the database
# answering), then run `plt-node <command>` (default: serve) as PID 1.
set -eu
/opt/plt/bin/python /opt/plt-container/provision.py
exec /opt/plt/bin/plt-node "$@"
