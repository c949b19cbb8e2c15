#!/bin/sh
# Write HAProxy's configuration from the environment, then run it in the foreground (PID 1).
#
#   BALANCER_BACKENDS  the node replicas, comma-separated host:port (required),
#                      e.g. node-13-a:8000,node-13-b:8000
#   BALANCER_PORT      where clients and peers connect (default 8000)
#
# Replicas are found by name through Docker's DNS (re-resolved every second, so a replica
# restarted with a new address is followed) and checked on /health every second: a killed
# replica leaves the rotation within about two seconds. /health, not /ready: while the
# province's database fails over every replica is alive and answers 503 itself, a problem
# the client understands ("retry"), rather than HAProxy's own page.
#
# A request whose connection to a replica could not be made is sent to another replica
# (`retry-on conn-failure`): it never reached the first one. A request cut after it was sent
# (the replica died while handling it) is answered 502 and never replayed here: it may have
# committed, and only the client can send it again with the same id (transfer_id, settlement
# reference), which the idempotent handler then recognises.
set -eu
: "${BALANCER_BACKENDS:?BALANCER_BACKENDS is required (host:port,host:port)}"
: "${BALANCER_PORT:=8000}"
config=/run/haproxy/haproxy.cfg
cat > "$config" <<CFG
global
    log stdout format raw local0 info
    maxconn 4096
    user haproxy
    group haproxy

resolvers docker
    nameserver dns 127.0.0.11:53
    resolve_retries 2
    timeout resolve 1s
    timeout retry 500ms
    hold valid 1s
    hold nx 1s
    hold obsolete 1s

defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s
    retries 3
    option redispatch 1
    retry-on conn-failure

frontend api
    bind :${BALANCER_PORT}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1 resolvers docker init-addr last,libc,none
CFG
i=0
for backend in $(echo "$BALANCER_BACKENDS" | tr ',' ' '); do
    i=$((i + 1))
    echo "    server replica-$i $backend" >> "$config"
done
echo "balancer: ${i} replicas behind :${BALANCER_PORT}: ${BALANCER_BACKENDS}" >&2
exec haproxy -W -db -f "$config"
