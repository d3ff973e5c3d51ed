"""`make bench` judges only what it made (bench.made.left_behind): its own
leftovers are reported, somebody else's processes, bridges and chains never."""
from __future__ import annotations

from bench.made import Link, Made, Proc, Seen, left_behind, removable_chains

BENCH = 4000
MARK = "0123456789abcdef"


def made() -> Made:
    m = Made(pid=BENCH, marker=MARK)
    m.procs.add((4100, 777))
    m.dirs |= {"/tmp/tether-bench-x1", "/tmp/tether-test-aaaaaa-q"}
    m.bridges |= {"tbaaaaaa", "nvbbbbbbb"}
    m.links.add("veth1234abcd")
    m.subnets |= {"10.150.3.0/24", "10.220.16.0/20"}
    m.names |= {"TTAAAAAA", "tbenchbbbbbb"}
    m.cgroup_prefixes.add("tether-test-aaaaaa-")
    return m


def proc(pid, cmd, ppid=1, start=1, state="S", marker=None, cgroup="0::/user.slice\n") -> Proc:
    return Proc(pid=pid, ppid=ppid, start=start, state=state, cmdline=cmd, marker=marker, cgroup=cgroup)


def somebody_elses() -> Seen:
    """A busy machine: nothing on it is the benchmark's."""
    return Seen(
        procs=[
            proc(1, "/sbin/init"),
            proc(BENCH, "python -m bench", ppid=900),
            proc(900, "-bash", ppid=1),
            proc(5000, "sleep 240", ppid=900),  # started in the same shell as the benchmark
            proc(5001, "sleep 240", ppid=1, marker="feedfacefeedface"),  # another benchmark's
            proc(5002, "/opt/tether/venv/bin/tether-fused --config /tmp/tether-test-cccccc-z/tether.toml"),
            proc(5003, "nc -ll -p 5432 -e echo db", cgroup="12:pids:/tether-test-cccccc-db\n"),
            proc(4100, "sleep 600", start=999),  # a reused pid of a process the benchmark started
            proc(5004, "", ppid=BENCH, state="Z"),  # a zombie child: gone when the benchmark exits
        ],
        links=[Link("lo"), Link("eth0"), Link("tbx-unrel"), Link("tbcccccc"), Link("tt0123456789", "tbcccccc"),
               Link("podman0"), Link("veth99999999", "podman0")],
        netns=["theirs"],
        rules=[
            "iptables-nft -t nat -P POSTROUTING ACCEPT",
            "iptables-nft -t nat -N NETAVARK-1D8721804F16F",
            "iptables-nft -t nat -A POSTROUTING -s 10.88.0.0/16 -j NETAVARK-1D8721804F16F",
            "iptables-nft -t nat -A NETAVARK-1D8721804F16F -d 10.88.0.0/16 -j ACCEPT",
            "iptables-legacy -t filter -N TTCCCCCC-FWD",
            "iptables-legacy -t filter -A FORWARD -j TTCCCCCC-FWD",
            # a wider network than ours (not in our subnet): not ours
            "iptables-legacy -t filter -A FORWARD -d 10.0.0.0/8 -j ACCEPT",
        ],
        mounts=["/", "/proc", "/tmp/tether-test-cccccc-z/run/fs", "/tmp/tether-bench-x10"],
        dirs=["/tmp/tether-test-cccccc-z", "/tmp/tether-bench-x10"],
        cgroups=["/sys/fs/cgroup/pids/tether-test-cccccc-db"],
    )


def test_nothing_of_anybody_else_counts():
    assert left_behind(made(), somebody_elses()) == {}


def test_every_kind_of_leftover_of_ours_is_reported():
    seen = somebody_elses()
    seen.procs = [p for p in seen.procs if p.pid != 4100]
    seen.procs += [
        proc(4100, "unshare -n sleep 600", start=777),  # a pid it recorded, same start time
        proc(4200, "sleep 600", ppid=4100),  # a child of one it started, which was orphaned
        proc(4300, "python3 -P -m fused.fs.server --fd 3", ppid=1, marker=MARK),  # orphaned: only its marker says so
        proc(4400, "nc -ll -p 5432 -e echo t1", cgroup="12:pids:/tether-test-aaaaaa-t1\n"),  # a container
        proc(4500, "lxcfs -f /tmp/tether-bench-x1/lxcfs-1/mnt", ppid=1),  # named by its dir
    ]
    seen.links += [Link("tbaaaaaa"), Link("ttfedcba9876", "tbaaaaaa"), Link("veth1234abcd")]
    seen.netns.append("tbenchbbbbbb-ns")
    seen.rules += [
        "iptables-legacy -t filter -N TTAAAAAA-FWD",
        "iptables-legacy -t filter -A FORWARD -j TTAAAAAA-FWD",
        "iptables-nft -t nat -N NETAVARK-ABCDEF0123456",
        "iptables-nft -t nat -A POSTROUTING -s 10.150.3.0/24 -j NETAVARK-ABCDEF0123456",
        "iptables-nft -t nat -A NETAVARK-ABCDEF0123456 ! -d 224.0.0.0/4 -j MASQUERADE",
        'iptables-nft -t nat -A NETAVARK-HOSTPORT-DNAT -p tcp --dport 30001 -m comment --comment "dnat name: tbenchbbbbbb id: 1f" -j NETAVARK-DN-1',
    ]
    seen.mounts.append("/tmp/tether-test-aaaaaa-q/run/fs")
    seen.dirs += ["/tmp/tether-bench-x1", "/tmp/tether-test-aaaaaa-q"]
    seen.cgroups.append("/sys/fs/cgroup/pids/tether-test-aaaaaa-t1")
    left = left_behind(made(), seen)
    assert [p.split()[0] for p in left.pop("processes")] == ["4100", "4200", "4300", "4400", "4500"]
    assert left.pop("links") == ["tbaaaaaa", "ttfedcba9876", "veth1234abcd"]
    assert left.pop("netns") == ["tbenchbbbbbb-ns"]
    rules = left.pop("chains/rules")
    assert "iptables-nft -t nat -N NETAVARK-ABCDEF0123456" in rules  # jumped to only by our rule
    assert "iptables-nft -t nat -A NETAVARK-ABCDEF0123456 ! -d 224.0.0.0/4 -j MASQUERADE" in rules  # in our chain
    assert "iptables-legacy -t filter -N TTAAAAAA-FWD" in rules and len(rules) == 6, rules
    assert not any("CCCCCC" in r or "1D8721804F16F" in r for r in rules)
    assert left.pop("mounts") == ["/tmp/tether-test-aaaaaa-q/run/fs"]
    assert left.pop("dirs") == ["/tmp/tether-bench-x1", "/tmp/tether-test-aaaaaa-q"]
    assert left.pop("cgroups") == ["/sys/fs/cgroup/pids/tether-test-aaaaaa-t1"]
    assert left == {}


def test_one_leftover_process_is_enough_to_fail():
    seen = somebody_elses()
    seen.procs.append(proc(4600, "unshare -n sleep 600", ppid=BENCH))
    assert left_behind(made(), seen) == {"processes": ["4600 unshare -n sleep 600"]}


def test_a_chain_somebody_else_also_jumps_to_is_not_ours():
    """netavark's shared chains: our rules add to them and jump to them, so do others'."""
    ours = [
        "iptables-nft -t filter -A NETAVARK_FORWARD -d 10.150.3.0/24 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "iptables-nft -t nat -A NETAVARK-DN-1 -s 10.150.3.0/24 -p tcp --dport 30001 -j NETAVARK-HOSTPORT-SETMARK",
    ]
    seen = Seen(rules=[
        "iptables-nft -t filter -N NETAVARK_FORWARD",
        "iptables-nft -t filter -A FORWARD -m comment --comment \"netavark firewall plugin rules\" -j NETAVARK_FORWARD",
        "iptables-nft -t nat -N NETAVARK-HOSTPORT-SETMARK",
        "iptables-nft -t nat -A NETAVARK-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000",
        "iptables-nft -t nat -A NETAVARK-DN-2 -s 10.88.0.0/16 -p tcp --dport 8080 -j NETAVARK-HOSTPORT-SETMARK",
        *ours,
    ])
    assert left_behind(made(), seen) == {"chains/rules": sorted(ours)}


def test_peer_chains_removed_only_when_nobody_else_uses_them():
    """After the peers' teardown: netavark's fixed chains and our network's empty
    DNAT chain go; a podman started meanwhile keeps its own and what it uses."""
    rules = [
        "iptables-nft -t nat -N NETAVARK-HOSTPORT-MASQ",
        "iptables-nft -t nat -N NETAVARK-HOSTPORT-DNAT",
        "iptables-nft -t nat -N NETAVARK-DN-OURS",
        "iptables-nft -t nat -N NETAVARK-DN-THEIRS",
        "iptables-nft -t filter -N NETAVARK_FORWARD",
        "iptables-nft -t nat -A POSTROUTING -j NETAVARK-HOSTPORT-MASQ",
        'iptables-nft -t nat -A NETAVARK-HOSTPORT-MASQ -m comment --comment "netavark portfw masq mark" -m mark --mark 0x2000/0x2000 -j MASQUERADE',
        "iptables-nft -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j NETAVARK-HOSTPORT-DNAT",
        'iptables-nft -t nat -A NETAVARK-HOSTPORT-DNAT -p tcp --dport 8080 -m comment --comment "dnat name: podman id: 9f" -j NETAVARK-DN-THEIRS',
        "iptables-nft -t nat -A NETAVARK-DN-THEIRS -p tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80",
        'iptables-nft -t filter -A FORWARD -m comment --comment "netavark firewall plugin rules" -j NETAVARK_FORWARD',
        "iptables-nft -t filter -A NETAVARK_FORWARD -d 10.88.0.0/16 -j ACCEPT",
    ]
    new = {("iptables-nft", "nat"): {"NETAVARK-HOSTPORT-MASQ", "NETAVARK-HOSTPORT-DNAT", "NETAVARK-DN-OURS",
                                      "NETAVARK-DN-THEIRS"},
           ("iptables-nft", "filter"): {"NETAVARK_FORWARD"}}
    assert removable_chains(made(), rules, new) == {("iptables-nft", "nat"): {"NETAVARK-HOSTPORT-MASQ", "NETAVARK-DN-OURS"}}
    # without the podman, all of them go
    alone = [r for r in rules if "THEIRS" not in r and "10.88." not in r]
    new[("iptables-nft", "nat")].discard("NETAVARK-DN-THEIRS")
    assert removable_chains(made(), alone, new) == new
