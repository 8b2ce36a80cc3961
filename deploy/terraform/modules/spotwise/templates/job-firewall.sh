#!/bin/bash
# Keeps the training processes (run_as user, spotwise-job by default) away from the instance
# metadata service: the instance role is the agent's, and a job uses only the credentials the
# agent scoped to its own checkpoints. Idempotent. Run as root by spotwise-agent.service before
# the agent starts (ExecStartPre=+, the drop-in cloud-init writes), so no job ever starts
# without the rule; a failure here keeps the agent from starting.
set -euo pipefail
user="${1:-spotwise-job}"
id "$user" >/dev/null

block() { # $1: iptables or ip6tables, $2: address
  "$1" -w 10 -C OUTPUT -m owner --uid-owner "$user" -d "$2" -j REJECT 2>/dev/null ||
    "$1" -w 10 -I OUTPUT 1 -m owner --uid-owner "$user" -d "$2" -j REJECT
}

block iptables 169.254.169.254/32   # IMDS (IPv4)
block iptables 169.254.170.2/32     # container credentials endpoint, should one be set up
if command -v ip6tables >/dev/null && [ -e /proc/net/if_inet6 ]; then
  block ip6tables fd00:ec2::254/128 # IMDS on Nitro instances (IPv6)
fi
echo "spotwise-job-firewall: $user cannot reach the instance metadata service"
