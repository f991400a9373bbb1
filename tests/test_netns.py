"""Two nodes without SLURM: torchrun agents in two network namespaces joined by a veth pair train together
and match the one-node result. Needs root and iproute2.

Each namespace is its own host with its own address, but `hostname` still resolves to 127.0.0.1 in both,
as on clusters whose /etc/hosts maps the hostname to a loopback address. Three settings make it work,
each one necessary: `--rdzv-conf=is_host=...` (no agent recognises the endpoint as its own address),
`--local-addr` (else the workers get MASTER_ADDR = the hostname) and GLOO_SOCKET_IFNAME (else gloo binds
the loopback address).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rundirs import assert_same_run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """task: tasks_for_tests:classification
seed: 1
optim: {lr: 0.01}
train: {epochs: 3, log_every: 1}
dist: {timeout_s: 60, init_timeout_s: 60}
"""
ADDRS = ("10.231.0.1", "10.231.0.2")


def env_with(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT / "tests")
    env.update(extra)
    return env


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def nodes():
    """Two namespaces, a veth pair between them: [(namespace, interface, address), ...]; always removed."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the network namespace tests need root and iproute2 (the `ip` command)")
    tag = f"ddpt{os.getpid()}"
    made = []
    try:
        for side, addr in zip("ab", ADDRS):
            ip("netns", "add", f"{tag}{side}")
            made.append(f"{tag}{side}")
        ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        out = []
        for side, addr in zip("ab", ADDRS):
            ns, dev = f"{tag}{side}", f"{tag}v{side}"
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
            out.append((ns, dev, addr))
        yield out
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{tag}va"], capture_output=True, timeout=30)  # if never moved
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert tag not in left, left


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: the same config on one node, 2 processes (`ddptrain launch`)."""
    tmp = tmp_path_factory.mktemp("one-node")
    (tmp / "exp.yaml").write_text(CONFIG)
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", "exp.yaml",
                           "runs_dir=runs"], cwd=tmp, env=env_with(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "exp"


def run_in(nodes, commands, cwd: Path, timeout=180):
    """Start commands[i] in namespace i (in its own session), wait for both; kill both on any failure."""
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=cwd, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for (ns, _, _), (cmd, env) in zip(nodes, commands)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # torchrun passes SIGTERM on to its workers (in their own sessions) and waits for them
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[1][-3000:] for o in outs)
    return outs


@pytest.mark.timeout(240)
def test_two_torchrun_agents_in_two_namespaces_rendezvous_c10d_and_match_one_node(tmp_path, nodes, one_node):
    (tmp_path / "exp.yaml").write_text(CONFIG)
    host = ADDRS[0]
    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                  "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:29400", "--rdzv-id=netns",
                  f"--rdzv-conf=is_host={int(addr == host)}", f"--local-addr={addr}",
                  "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
                  "-m", "ddptrain", "train", "exp.yaml", "runs_dir=runs"],
                 env_with(GLOO_SOCKET_IFNAME=dev, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
                for _, dev, addr in nodes]
    run_in(nodes, commands, tmp_path)
    # whichever agent the rendezvous made group rank 0 wrote the run directory, in the shared tmp_path
    assert_same_run(tmp_path / "runs" / "exp", one_node)


@pytest.mark.timeout(240)
def test_launch_multi_node_script_across_two_namespaces_matches_one_node(tmp_path, nodes, one_node):
    """launch/multi_node.sh (static rendezvous at node 0) with LOCAL_ADDR and GLOO_SOCKET_IFNAME."""
    (tmp_path / "exp.yaml").write_text(CONFIG)
    commands = [([str(ROOT / "launch" / "multi_node.sh"), "exp.yaml", "runs_dir=runs"],
                 env_with(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR=ADDRS[0], MASTER_PORT="29500",
                          NPROC_PER_NODE="1", LOCAL_ADDR=addr, GLOO_SOCKET_IFNAME=dev))
                for rank, (_, dev, addr) in enumerate(nodes)]
    outs = run_in(nodes, commands, tmp_path)
    assert "done: 9 steps" in outs[0][0]  # node 0 hosts rank 0
    assert_same_run(tmp_path / "runs" / "exp", one_node)
