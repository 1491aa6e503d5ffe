#!/usr/bin/env python3
"""Launcher preflight: a clear message within seconds instead of a hang or an obscure error.

    python launch/preflight.py --launcher deepspeed|mpirun|torchrun|slurm
        [--hostfile H] [--master-addr A] [--master-port P] [--node-rank R] [--no-ssh]
        [--multinode-launcher pdsh|openmpi|...] [--timeout S]

Exit 0 when every check passes, 1 with one ``preflight: ERROR`` block per problem (what is wrong,
then ``fix:``) otherwise, 2 on bad arguments. Standard library only, so it runs before (and
without) torch. What is checked:

* tools: ``mpirun`` on PATH (mpirun), the ``deepspeed`` launcher, ``pdsh`` when the deepspeed
  launcher reaches several hosts over its default pdsh transport (``mpirun`` for its openmpi
  transport), ``srun`` / ``sbatch`` (slurm); mpi4py importable and its MPI library loadable (mpirun).
* hostfile: readable, ``host slots=N`` lines. Every host must resolve (name lookup, bounded by
  ``--timeout``); a host that is not this machine must accept a TCP connection on its ssh port
  (22, or ``PREFLIGHT_SSH_PORT``) within ``--timeout`` when the launcher reaches it over ssh
  (deepspeed with pdsh/openmpi, mpirun). That is a connect only, no ssh login, no ping.
* master: the address resolves; on the node that hosts the rendezvous (node rank 0 / the
  launching node, when the address is this machine) the port must be free to listen on, since
  a busy port makes rank 0 fail or, worse, the other ranks join someone else's rendezvous.
* ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, when set, name interfaces this machine has.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import errno
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import List, Optional, Tuple

Problem = Tuple[str, str]  # (what is wrong, how to fix it)


def parse_hostfile(path: str) -> Tuple[List[Tuple[str, int]], List[Problem]]:
    hosts: List[Tuple[str, int]] = []
    problems: List[Problem] = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        return [], [(f"hostfile {path} cannot be read: {e.strerror}",
                     "pass an existing file: one line per node, 'hostname slots=N'")]
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 1
        bad = False
        for p in parts[1:]:
            if p.startswith("slots="):
                try:
                    slots = int(p[len("slots="):])
                except ValueError:
                    bad = True
            else:
                bad = True
        if bad or slots < 1:
            problems.append((f"hostfile {path} line {n}: {line!r} is not 'hostname slots=N'",
                             "write one node per line, e.g. 'node0 slots=8'"))
            continue
        hosts.append((parts[0], slots))
    if not hosts and not problems:
        problems.append((f"hostfile {path} lists no hosts", "add one line per node, 'hostname slots=N'"))
    return hosts, problems


def resolve(host: str, timeout: float) -> Tuple[Optional[List[str]], str]:
    """Addresses of ``host`` (None if it does not resolve), with the lookup bounded by ``timeout``."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
    try:
        infos = fut.result(timeout=timeout)
        return sorted({i[4][0] for i in infos}), ""
    except concurrent.futures.TimeoutError:
        return None, f"name lookup took longer than {timeout:g} s"
    except socket.gaierror as e:
        return None, e.strerror or str(e)
    finally:
        pool.shutdown(wait=False)


_local_cache: Optional[set] = None


def local_addresses() -> set:
    """Addresses of this machine: loopback, its hostname's, and its interfaces' (via `hostname -I`)."""
    global _local_cache
    if _local_cache is None:
        addrs = {"127.0.0.1", "::1"}
        for name in {socket.gethostname(), socket.getfqdn()}:
            got, _ = resolve(name, 2.0)
            addrs.update(got or [])
        try:
            out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=2).stdout
            addrs.update(out.split())
        except (OSError, subprocess.SubprocessError):
            pass
        _local_cache = addrs
    return _local_cache


def is_local(addrs: List[str]) -> bool:
    return any(a.startswith("127.") or a in local_addresses() for a in addrs)


def tcp_reachable(addr: str, port: int, timeout: float) -> Tuple[bool, str]:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True, ""
    except socket.timeout:
        return False, f"no answer within {timeout:g} s"
    except OSError as e:
        return False, e.strerror or str(e)


def port_in_use(port: int) -> Optional[str]:
    """Why ``port`` cannot be listened on here (None if it can). Binds like the rendezvous does."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            s.listen(1)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return e.strerror
            if family == socket.AF_INET6:
                continue
            return e.strerror
        finally:
            s.close()
    return None


def free_port_hint() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tool(name: str) -> Optional[str]:
    """On PATH, or next to this Python (a venv's console scripts)."""
    found = shutil.which(name)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else None


def check(args) -> List[Problem]:
    problems: List[Problem] = []
    launcher = args.launcher
    hosts: List[Tuple[str, int]] = []
    if args.hostfile:
        hosts, problems = parse_hostfile(args.hostfile)
    multi_host = len(hosts) > 1

    # --- tools
    if launcher == "mpirun":
        if not shutil.which("mpirun"):
            problems.append(("mpirun not found on PATH (the mpirun launcher needs Open MPI)",
                             "install Open MPI (Debian/Ubuntu: scripts/install-system-deps.sh, i.e. apt-get install "
                             "openmpi-bin libopenmpi-dev), or load your cluster's MPI module; or use "
                             "launch/torchrun.sh or launch/deepspeed.sh instead"))
        else:
            problems += check_mpi4py(args.timeout)
    elif launcher == "deepspeed":
        if not find_tool("deepspeed"):
            problems.append(("the deepspeed launcher was not found (not on PATH, not next to this python)",
                             "activate the project's venv (make venv; . .venv/bin/activate) or pip install deepspeed"))
        if multi_host and not args.no_ssh:
            transport = args.multinode_launcher
            need = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun",
                    "mvapich": "mpirun_rsh", "slurm": "srun"}.get(transport)
            if need and not shutil.which(need):
                pkg = {"pdsh": "pdsh", "mpirun": "openmpi-bin"}.get(need, need)
                problems.append((f"{need} not found on PATH: the deepspeed launcher reaches the {len(hosts)} hosts of "
                                 f"{args.hostfile} through {transport}",
                                 f"install it (Debian/Ubuntu: apt-get install {pkg}; scripts/install-system-deps.sh), "
                                 "or start one launcher per node with launch/deepspeed-node.sh (--no_ssh, no pdsh "
                                 "needed)"))
    elif launcher == "torchrun":
        if importlib.util.find_spec("torch") is None and not find_tool("torchrun"):
            problems.append(("torch is not importable by this python, so torchrun cannot start",
                             "activate the project's venv (make venv; . .venv/bin/activate)"))
    elif launcher == "slurm":
        in_job = bool(os.environ.get("SLURM_JOB_ID"))
        for tool in (["srun"] if in_job else ["sbatch", "srun"]):
            if not shutil.which(tool):
                problems.append((f"{tool} not found on PATH (Slurm is not installed or not loaded here)",
                                 "run on a Slurm login/compute node (module load slurm), or use another launcher "
                                 "(launch/deepspeed.sh, launch/torchrun.sh, launch/mpirun.sh)"))

    # --- hosts of the hostfile
    over_ssh = (launcher == "mpirun" or (launcher == "deepspeed" and not args.no_ssh)) and bool(hosts)
    ssh_port = int(os.environ.get("PREFLIGHT_SSH_PORT", "22"))
    for host, _ in hosts:
        addrs, why = resolve(host, args.timeout)
        if addrs is None:
            problems.append((f"host {host!r} in {args.hostfile} does not resolve ({why})",
                             "fix the name in the hostfile, or add it to DNS or /etc/hosts on every node"))
            continue
        if over_ssh and not is_local(addrs):
            ok, why = tcp_reachable(addrs[0], ssh_port, args.timeout)
            if not ok:
                problems.append((f"host {host!r} ({addrs[0]}) in {args.hostfile} is unreachable: TCP port {ssh_port} "
                                 f"(ssh) {why}",
                                 "check the node is up and runs sshd, and that no firewall blocks it (the launcher "
                                 "logs in over ssh); or remove it from the hostfile"))

    # --- master address and port
    addr = args.master_addr
    if addr:
        addrs, why = resolve(addr, args.timeout)
        if addrs is None:
            problems.append((f"master address {addr!r} does not resolve ({why})",
                             "set MASTER_ADDR / --master_addr to node 0's IP address or a name every node resolves"))
        elif args.master_port is not None and args.node_rank == 0 and is_local(addrs):
            why = port_in_use(args.master_port)
            if why:
                problems.append((f"master port {args.master_port} on {addr} is busy ({why}): another job or a "
                                 "leftover process is listening there",
                                 f"pick another port (MASTER_PORT / --master_port), e.g. a free one now: "
                                 f"{free_port_hint()}; or stop the process holding it "
                                 f"(ss -ltnp 'sport = :{args.master_port}')"))
    if args.master_port is not None and not (1 <= args.master_port <= 65535):
        problems.append((f"master port {args.master_port} is out of range", "use a port between 1024 and 65535"))

    # --- interfaces named for gloo / NCCL
    try:
        names = {n for _, n in socket.if_nameindex()}
    except OSError:
        names = set()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        val = os.environ.get(var)
        if names and val and not val.startswith(("^", "=")):
            missing = [i for i in val.split(",") if i and i not in names]
            if missing:
                problems.append((f"{var}={val}: this machine has no interface {', '.join(missing)}",
                                 f"set {var} to one of: {', '.join(sorted(names))} (lo on a single machine), "
                                 "or unset it"))
    return problems


def check_mpi4py(timeout: float) -> List[Problem]:
    """mpi4py importable and its MPI library loadable (without MPI_Init, in a child process)."""
    code = ("import mpi4py, sys; mpi4py.rc.initialize = False; from mpi4py import MPI; "
            "print(MPI.Get_library_version().splitlines()[0])")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=max(timeout, 10))
    except subprocess.TimeoutExpired:
        return [("importing mpi4py hangs", "check the MPI installation (ldconfig -p | grep libmpi)")]
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return [(f"mpi4py cannot load an MPI library with this python ({last})",
                 "install Open MPI's library (apt-get install libopenmpi-dev) and mpi4py (pip install mpi4py)")]
    return []


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", required=True, choices=["deepspeed", "mpirun", "torchrun", "slurm"])
    p.add_argument("--hostfile")
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank: only node 0 listens on the master port")
    p.add_argument("--no-ssh", action="store_true", help="deepspeed --no_ssh: one launcher per node, no pdsh/ssh")
    p.add_argument("--multinode-launcher", default="pdsh", help="deepspeed --launcher (pdsh, openmpi, ...)")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("PREFLIGHT_TIMEOUT", "2")),
                   help="seconds for each name lookup and TCP connect (default 2)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    problems = check(args)
    for what, fix in problems:
        print(f"preflight: ERROR: {what}\n  fix: {fix}", file=sys.stderr)
    if problems:
        print(f"preflight: {args.launcher}: {len(problems)} problem(s), not launching", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"preflight: {args.launcher}: ok ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
