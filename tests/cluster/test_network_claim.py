"""Claiming a cluster's network: a killed owner's leftovers are reclaimed, a running cluster is not.

A test run or a `robustseg cluster up` shell killed with SIGKILL never reaches `down`: its
bridge and namespaces stay, with no process in them. The next `up` on that prefix must take
them back (else the prefix is lost until someone cleans by hand), and must never take a
network that still has a process in it. Needs root and namespaces, like the cluster tests.
"""
from __future__ import annotations

import subprocess

import pytest

from cluster_ops import require_namespaces
from deploy import local_cluster as lc


@pytest.fixture
def spec(tmp_path):
    require_namespaces()
    prefix, subnet = lc.free_name("rsn")
    s = lc.ClusterSpec(state_dir=str(tmp_path), prefix=prefix, subnet=subnet)
    lc._reclaim(prefix, lc._plan(s).bridge)  # what a killed run of this test left (free_name: nothing runs there)
    yield s
    lc._reclaim(s.prefix, lc._plan(s).bridge)
    assert not lc._links_of(s.prefix) and not lc._namespaces_of(s.prefix)


def test_leftover_network_is_reclaimed_and_a_running_one_refused(spec):
    c = lc._plan(spec)
    assert lc._make_network(c) == []
    made = sorted(lc._links_of(spec.prefix))
    assert f"{spec.prefix}br0" in made and len(made) == 1 + len(c.nodes)
    # The owner was killed before `down`: nothing runs in its namespaces. Claiming again reclaims.
    reclaimed = lc._make_network(c)
    assert reclaimed == sorted(n.netns for n in c.nodes.values()) + [c.bridge]
    assert sorted(lc._links_of(spec.prefix)) == made  # and the network is whole again, made afresh
    # A process in one namespace: the cluster is running, so the claim is refused and nothing is touched.
    sleeper = subprocess.Popen(["ip", "netns", "exec", c.head.netns, "sleep", "60"])
    try:
        for _ in range(50):
            if lc._ip("netns", "pids", c.head.netns, check=False).stdout.split():
                break
            subprocess.run(["sleep", "0.1"])
        with pytest.raises(lc.ClusterTaken, match=rf"{c.head.netns}: 1 processes"):
            lc._make_network(c)
        assert sorted(lc._links_of(spec.prefix)) == made
        assert sleeper.poll() is None
        # free_name skips the running prefix.
        assert lc.free_name("rsn")[0] != spec.prefix
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_subnet_in_use_is_refused_by_name(spec, tmp_path):
    c = lc._plan(spec)
    lc._make_network(c)
    other = lc._plan(lc.ClusterSpec(state_dir=str(tmp_path / "o"), prefix=spec.prefix + "x", subnet=spec.subnet))
    with pytest.raises(lc.ClusterTaken, match=rf"subnet {spec.subnet}.0/24 is in use on this machine "
                                              rf"\(on {c.bridge}\): choose another --subnet"):
        lc._make_network(other)
    assert lc._ip("link", "show", other.bridge, check=False).returncode != 0  # nothing of the refused one made
