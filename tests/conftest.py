"""Fixtures shared by the Slurm tests (one node: test_slurm.py; two nodes: test_multihost_slurm.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sf2dist.data import synth
from tests.jobs import CLUSTER



def _idle_nodes() -> tuple[list[str], str | None]:
    """The nodes sinfo shows idle (or running jobs), and why there are none."""
    if shutil.which("sinfo") is None:
        return [], "sinfo is not installed"
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return [], f"sinfo failed: {result.stderr.strip()}"
    nodes = sorted({line.split()[0] for line in result.stdout.splitlines()
                    if line.split()[1].rstrip("*~#") in ("idle", "mixed", "allocated")})
    return nodes, None if nodes else f"no idle node (sinfo: {result.stdout.strip() or 'nothing'})"


def _cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The nodes of the Slurm test cluster: the one running (.ci/run starts it), else one this
    session starts (two hosts where network namespaces can be made, else one) and stops at its end.
    A cluster found running is left running."""
    nodes, problem = _idle_nodes()
    started = False
    if not nodes:
        if os.geteuid() != 0:
            pytest.skip(f"no Slurm cluster here ({problem}) and not root, so tests/slurm/cluster.sh cannot start one")
        up = _cluster("up", "--hosts", "2")
        if up.returncode != 0:
            _cluster("down")
            up = _cluster("up")
        started = True
        nodes, _ = _idle_nodes()
        if not nodes:
            _cluster("down")
            pytest.skip(f"no Slurm cluster here ({problem}); tests/slurm/cluster.sh up failed: "
                        f"{(up.stderr or up.stdout).strip()[-500:]}")
    yield nodes
    if started:
        _cluster("down")


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    """40 training identities x 8 images and 100 held-out pairs, 32x32: a job's data."""
    out = tmp_path_factory.mktemp("slurm-synth") / "tiny"
    return synth.generate(out, identities=40, images_per_identity=8, holdout_identities=20, pairs=100, size=32,
                          seed=3, workers=0)
