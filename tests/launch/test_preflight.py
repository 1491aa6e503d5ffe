"""launch/preflight.py: a clear message naming the problem and the fix, within seconds."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from padnet_ds.comm import free_port

PREFLIGHT = Path(__file__).resolve().parents[2] / "launch" / "preflight.py"
FAST_S = 10.0


def preflight(*args, path=None, **env_extra):
    env = dict(os.environ, **env_extra)
    if path is not None:
        env["PATH"] = str(path)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(PREFLIGHT), *args], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < FAST_S, f"preflight took {elapsed:.1f} s"
    return r


def test_ok_on_localhost():
    r = preflight("--launcher", "torchrun", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
    assert r.returncode == 0, r.stderr


def test_missing_mpirun(tmp_path):
    r = preflight("--launcher", "mpirun", "--master-addr", "127.0.0.1", path=tmp_path)
    assert r.returncode == 1
    assert "mpirun not found on PATH" in r.stderr and "fix:" in r.stderr and "openmpi-bin" in r.stderr


def test_missing_pdsh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    r = preflight("--launcher", "deepspeed", "--hostfile", str(hostfile), path=empty)
    assert r.returncode == 1
    assert "pdsh not found on PATH" in r.stderr and "apt-get install pdsh" in r.stderr
    # the per-node mode needs no pdsh
    r = preflight("--launcher", "deepspeed", "--no-ssh", "--hostfile", str(hostfile), path=empty)
    assert r.returncode == 0, r.stderr


def test_host_that_does_not_resolve(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nno-such-node.invalid slots=1\n")
    r = preflight("--launcher", "deepspeed", "--no-ssh", "--hostfile", str(hostfile))
    assert r.returncode == 1
    assert "'no-such-node.invalid'" in r.stderr and "does not resolve" in r.stderr and "/etc/hosts" in r.stderr


def test_host_unreachable_over_ssh(tmp_path):
    """A host that resolves but does not answer on its ssh port within the timeout (TEST-NET-1
    address: refused or silent, either way a message within seconds)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("192.0.2.1 slots=1\n")  # TEST-NET-1: never a real host
    r = preflight("--launcher", "mpirun", "--hostfile", str(hostfile), "--timeout", "1")
    if "mpirun not found" in r.stderr:
        pytest.skip("mpirun not installed")
    assert r.returncode == 1
    assert "'192.0.2.1'" in r.stderr and "unreachable" in r.stderr and "sshd" in r.stderr


def test_busy_master_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = preflight("--launcher", "torchrun", "--master-addr", "127.0.0.1", "--master-port", str(port))
    assert r.returncode == 1
    assert f"master port {port}" in r.stderr and "busy" in r.stderr and "MASTER_PORT" in r.stderr
    # node rank 1 joins the rendezvous on that port: busy is expected there
    r = preflight("--launcher", "torchrun", "--node-rank", "1", "--master-addr", "127.0.0.1",
                  "--master-port", str(port))
    assert r.returncode == 0, r.stderr


def test_bad_hostfile_and_interface(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 gpus=8\n")
    r = preflight("--launcher", "deepspeed", "--hostfile", str(hostfile), GLOO_SOCKET_IFNAME="nosuchif0")
    assert r.returncode == 1
    assert "is not 'hostname slots=N'" in r.stderr and "GLOO_SOCKET_IFNAME=nosuchif0" in r.stderr


def test_launch_script_stops_before_launching(tmp_path):
    """launch/mpirun.sh where there is no mpirun: the preflight message, no hang, no traceback."""
    launch = Path(__file__).resolve().parents[2] / "launch" / "mpirun.sh"
    for tool in ("dirname", "nproc", "grep", "id"):  # what the script uses, mpirun left out
        src = next(Path(d, tool) for d in ("/usr/bin", "/bin") if Path(d, tool).exists())
        (tmp_path / tool).symlink_to(src)
    env = dict(os.environ, PATH=str(tmp_path), PYTHON=sys.executable)
    t0 = time.monotonic()
    r = subprocess.run(["/bin/bash", str(launch), "train", "configs/smoke.yaml"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert time.monotonic() - t0 < FAST_S
    assert r.returncode == 1 and "mpirun not found on PATH" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
