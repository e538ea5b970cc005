#!/usr/bin/env bash
# An ssh stand-in for Open MPI that runs the remote command on this machine, so a multi-node
# mpirun launch (several hosts in the hostfile) can run on one machine:
#
#   OMPI_MCA_plm_rsh_agent=/path/to/scripts/local_rsh_agent.sh HL_HOSTSFILE=hosts ... pretrain_deepseek.sh
#   (or mpirun --mca plm_rsh_agent /path/to/scripts/local_rsh_agent.sh ...)
#
# with hosts such as 127.0.0.1 and 127.0.0.2 (mpirun starts its daemon for every host other than
# its own through the agent). Called as `agent [ssh options] host command...`: the ssh options
# are skipped, the host is only checked to be local (a loopback address or this machine's name),
# and the command is run by /bin/sh as ssh would run it.
set -euo pipefail

# ssh options that take a value (`-p 22` or `-p22`)
with_value="BbcDEeFIiJLlmOoQRSWw"
while (($# > 0)); do
    case "$1" in
        --) shift; break ;;
        -?*)
            opt=${1:1:1}
            if [[ "$with_value" == *"$opt"* && ${#1} -eq 2 ]]; then shift 2; else shift; fi
            ;;
        *) break ;;
    esac
done
(($# >= 2)) || { echo "local_rsh_agent.sh: usage: local_rsh_agent.sh [ssh options] host command..." >&2; exit 255; }
host=$1
shift
case "$host" in
    127.* | localhost | ::1 | "$(hostname)" | "$(hostname -f 2>/dev/null || hostname)") ;;
    *) echo "local_rsh_agent.sh: '$host' is not this machine; this agent only runs commands locally" >&2; exit 255 ;;
esac
exec /bin/sh -c "$*"
