"""tether's accepts in other tools' iptables chains, without a kernel: what
`iptables -S` (or -save) listings say about Docker's FORWARD and DOCKER-USER,
and what tether writes into them."""
from __future__ import annotations

from fused import rules
from fused.net.firewall.foreign import Admission, judge, parse, quote, rewrite

MARK = "tether TT1: forwarding of its bridge"
OURS = [("-i", "tb0", "-m", "comment", "--comment", MARK, "-j", "ACCEPT"),
        ("-o", "tb0", "-m", "comment", "--comment", MARK, "-j", "ACCEPT")]

# Debian 12's docker.io (20.10) after it turned forwarding on
DOCKER_20 = """-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-ISOLATION-STAGE-2
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
"""

# a user's DOCKER-USER (Docker's documentation: restrict who reaches containers)
USER_DROP = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -i eth0 ! -s 192.168.1.0/24 -j DROP
-A DOCKER-USER -j RETURN
COMMIT
"""


def admission() -> Admission:
    return Admission("TT1", rules.admissions("tb0"))


def test_the_listing_of_a_table():
    chains = parse(DOCKER_20)
    assert chains["FORWARD"].policy == "DROP" and chains["DOCKER-USER"].policy is None
    assert chains["FORWARD"].rules[0] == ("-j", "DOCKER-USER")
    assert chains["DOCKER-USER"].rules == (("-j", "RETURN"),)
    save = parse(USER_DROP)  # iptables-save's form: the same chains
    assert save["FORWARD"].policy == "ACCEPT" and save["DOCKER-USER"].policy is None
    assert save["DOCKER-USER"].rules[0] == ("-i", "eth0", "!", "-s", "192.168.1.0/24", "-j", "DROP")


def test_what_tether_wants_is_what_iptables_lists():
    assert admission().want() == OURS
    listed = parse(f'-P FORWARD DROP\n-A FORWARD -i tb0 -m comment --comment "{MARK}" -j ACCEPT\n'
                   f'-A FORWARD -o tb0 -m comment --comment "{MARK}" -j ACCEPT\n')
    assert list(listed["FORWARD"].rules) == OURS


def test_a_drop_policy_drops_until_tethers_accepts_are_there():
    f = judge("iptables-nft", parse(DOCKER_20)["FORWARD"], OURS, "tether TT1:")
    assert f.drops == "policy DROP" and f.ours == () and f.broken
    assert rewrite("FORWARD", f.ours, OURS) == [
        f'-I FORWARD 1 -i tb0 -m comment --comment "{MARK}" -j ACCEPT',
        f'-I FORWARD 2 -o tb0 -m comment --comment "{MARK}" -j ACCEPT',
    ]
    healed = DOCKER_20 + "".join(f"-A FORWARD {' '.join(quote(w) for w in r)}\n" for r in OURS)
    f = judge("iptables-nft", parse(healed)["FORWARD"], OURS, "tether TT1:")
    assert f.drops == "policy DROP" and not f.broken  # after Docker's jump: DOCKER-USER only returns


def test_docker_user_that_only_returns_lets_tether_through():
    f = judge("iptables-nft", parse(DOCKER_20)["DOCKER-USER"], OURS, "tether TT1:")
    assert f.drops is None and not f.broken


def test_a_drop_in_docker_user_needs_tethers_accepts_before_it():
    chain = parse(USER_DROP)["DOCKER-USER"]
    f = judge("iptables-legacy", chain, OURS, "tether TT1:")
    assert f.broken and f.drops == "`-A DOCKER-USER -i eth0 '!' -s 192.168.1.0/24 -j DROP`"
    # after the drop (someone appended them, or inserted the drop above): wrong place, written again
    after = USER_DROP.replace("COMMIT", "".join(f"-A DOCKER-USER {' '.join(quote(w) for w in r)}\n" for r in OURS) + "COMMIT")
    f = judge("iptables-legacy", parse(after)["DOCKER-USER"], OURS, "tether TT1:")
    assert f.broken and len(f.ours) == 2
    lines = rewrite("DOCKER-USER", f.ours, OURS)
    assert [ln.split()[0] for ln in lines] == ["-D", "-D", "-I", "-I"]
    # at the top: right
    top = USER_DROP.replace("-A DOCKER-USER -i eth0", "".join(
        f"-A DOCKER-USER {' '.join(quote(w) for w in r)}\n" for r in OURS) + "-A DOCKER-USER -i eth0")
    assert not judge("iptables-legacy", parse(top)["DOCKER-USER"], OURS, "tether TT1:").broken


def test_one_accept_of_two_or_another_bridges_is_not_enough():
    half = DOCKER_20 + f'-A FORWARD -i tb0 -m comment --comment "{MARK}" -j ACCEPT\n'
    assert judge("iptables-nft", parse(half)["FORWARD"], OURS, "tether TT1:").broken
    stale = DOCKER_20 + "".join(f"-A FORWARD {' '.join(quote(w) for w in r)}\n" for r in OURS).replace("tb0", "old0")
    f = judge("iptables-nft", parse(stale)["FORWARD"], OURS, "tether TT1:")
    assert f.broken and len(f.ours) == 2  # both go, the right ones come
    assert [ln.split()[0] for ln in rewrite("FORWARD", f.ours, OURS)] == ["-D", "-D", "-I", "-I"]


def test_another_prefix_s_accepts_are_not_ours():
    theirs = DOCKER_20 + "".join(f"-A FORWARD {' '.join(quote(w) for w in r)}\n" for r in OURS).replace("TT1", "TT12")
    f = judge("iptables-nft", parse(theirs)["FORWARD"], OURS, "tether TT1:")
    assert f.ours == () and f.broken


def test_without_the_bridge_two_marked_accepts_do():
    """doctor without a bridge named (or a driver before its first apply):
    any two rules with this prefix's mark count."""
    healed = DOCKER_20 + "".join(f"-A FORWARD {' '.join(quote(w) for w in r)}\n" for r in OURS)
    assert not judge("iptables-nft", parse(healed)["FORWARD"], None, "tether TT1:").broken
    assert judge("iptables-nft", parse(DOCKER_20)["FORWARD"], None, "tether TT1:").broken


def test_a_comment_as_iptables_quotes_it():
    chains = parse('-A DOCKER-USER -m comment --comment "a user\\\'s \\"drop\\"" -j DROP\n')
    assert chains["DOCKER-USER"].rules == (("-m", "comment", "--comment", 'a user\'s "drop"', "-j", "DROP"),)
