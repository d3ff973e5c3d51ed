"""`tether-fused --rebuild-store`: a new store from the containers that run.

For a store that was lost or quarantined while containers ran. Everything it
knows comes from what is still live, never from a guess:

- which containers: the processes whose mount namespace holds a mount of
  this daemon's served files (`<run_dir>/fs/NAME/...`, the same filesystem
  device), which also names them;
- each one's pid and netns, and its address and MAC from its `eth0`;
- its OCI id, bundle and annotations (expose, publish), from the list of a
  runtime root that has it (runc's default and `--runc-root`), else its name
  stands in for the id until its next start;
- its links, with their facade addresses, from the hosts file the file
  server still serves it: the last snapshot before the store was lost,
  retargets made at run time included.

Host ports are not in any of these: each container gets its published ports
again at its next start (an explicit one exactly, an automatic one from the
pool). Stopped containers, and links that had no hosts line (dangling), are
not rebuilt. Parsing (`parse_mountinfo`, `parse_hosts`) is pure.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import time
from dataclasses import dataclass

from . import drift, model, plan
from .model import Container, IpLease, Link
from .render import LOCALHOST
from .store.base import Draft, Store

log = logging.getLogger("tether.rebuild")


def parse_mountinfo(text: str, dev: str) -> str | None:
    """The name whose served files a mountinfo (one process's) mounts from
    the filesystem `dev` ("major:minor"); None if it mounts none."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] == dev and fields[3] != "/":
            name = fields[3].strip("/").split("/")[0]
            if model.is_label(name):
                return name
    return None


def parse_hosts(text: str, own: str) -> list[tuple[str, str, str]]:
    """(address, alias, target) of each link line of a served hosts file."""
    out = []
    body = text[len(LOCALHOST):] if text.startswith(LOCALHOST) else text
    for line in body.splitlines():
        addr, _, names = line.partition("\t")
        parts = names.split()
        if not parts or parts == [own]:
            continue
        alias, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        if model.is_label(alias) and model.is_label(target):
            out.append((addr, alias, target))
    return out


@dataclass(frozen=True)
class Found:
    name: str
    pid: int


def _init_of_its_pid_ns(pid: str) -> bool:
    """pid 1 inside its own pid namespace: a container's first process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def find(fs_dir) -> list[Found]:
    """The running containers that mount this daemon's files: one per mount
    namespace, the process that is pid 1 in its pid namespace (else the
    lowest pid: pids wrap, so a child may have a lower one)."""
    st = os.stat(fs_dir)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mine = os.stat("/proc/self/ns/mnt").st_ino
    names: dict[int, str] = {}  # mount namespace -> the name it mounts
    pids: dict[int, list[int]] = {}
    for entry in sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int):
        try:
            ns = os.stat(f"/proc/{entry}/ns/mnt").st_ino
            if ns == mine:
                continue
            if ns not in names:
                with open(f"/proc/{entry}/mountinfo") as f:
                    name = parse_mountinfo(f.read(), dev)
                if name is None:
                    names[ns] = ""
                    continue
                names[ns] = name
            if names[ns]:
                pids.setdefault(ns, []).append(int(entry))
        except OSError:
            continue
    found = []
    for ns, candidates in pids.items():
        init = next((p for p in candidates if _init_of_its_pid_ns(str(p))), candidates[0])
        found.append(Found(names[ns], init))
    return sorted(found, key=lambda f: f.name)


async def rebuild(store: Store, cfg, wiring, worker, runc_roots: list[str], netns_inode) -> list[str]:
    """Write what the running containers say into `store` (a new one);
    returns one line per container and link rebuilt."""
    now = time.time()
    found = find(cfg.fs_dir)
    runc = shutil.which("runc")
    cmds = {(os.path.realpath(runc), "--root", root) for root in runc_roots} if runc else set()
    seen = {}
    for listing in (await drift.listings(cmds)).values():
        for s in listing:
            seen.setdefault(s.id, s)
    lines: list[str] = []
    d = Draft(store.snapshot())
    facades = cfg.network.facade_network
    links: list[tuple[str, str, str, str]] = []
    for f in found:
        ino = netns_inode(f.pid)
        eth0 = await worker.run(wiring.eth0_of, f.pid) if ino is not None else None
        if eth0 is None:
            log.warning("rebuild: %s (pid %d) has no eth0 from tether: skipped", f.name, f.pid)
            continue
        ip, mac, answers = eth0
        if any(l.ip == ip for l in d.ip_leases()):
            log.warning("rebuild: %s has %s, which another container has too: skipped", f.name, ip)
            continue
        s = next((s for s in seen.values() if s.annotations.get(model.ANN_NAME, s.id) == f.name), None)
        ann = s.annotations if s is not None else {}
        expose = tuple(str(p) for p in model.parse_expose(ann.get(model.ANN_EXPOSE, ""))) if ann else ()
        publish = tuple(str(p) for p in model.parse_publish(ann.get(model.ANN_PUBLISH, ""))) if ann else ()
        d.put(Container(
            f.name, s.id if s is not None else f.name, model.RUNNING, f.pid, ino, s.bundle if s else "",
            now, now, None, f"rebuilt from the running container at {plan.stamp(now)}", expose, publish,
            answers=answers,  # the addresses a move gave it
        ))
        d.put_ip_lease(IpLease(ip, f.name, mac, now))
        lines.append(f"{f.name}: {ip} {mac}, id {s.id if s else '(unknown: its name for now)'}"
                     + (f", answering at {', '.join(answers)} too" if answers else ""))
        try:
            with open(cfg.fs_dir / f.name / "hosts") as h:
                text = h.read()
        except OSError:
            text = ""
        for addr, alias, target in parse_hosts(text, f.name):
            links.append((f.name, alias, target, addr))
    exposed: dict[str, set[str]] = {}
    for consumer, _, target, _ in links:  # what consumers' ports files say a target exposes
        try:
            with open(cfg.fs_dir / consumer / "ports") as p:
                for row in p.read().splitlines():
                    alias, proto, port, _addr = row.split("\t")
                    if any(l[0] == consumer and l[1] == alias and l[2] == target for l in links):
                        exposed.setdefault(target, set()).add(f"{port}/{proto}")
        except (OSError, ValueError):
            pass
    for target, ports in exposed.items():
        c = d.container(target)
        if c is not None and not c.expose:
            d.update(target, expose=tuple(sorted(ports)))
    for consumer, alias, target, addr in links:
        facade = addr if cfg.network.strategy == "facade" and ipaddress.ip_address(addr) in facades else None
        d.put_link(Link(consumer, alias, facade, plan.join_group(d, target)))
        lines.append(f"link {model.link_text(alias, target, consumer)}" + (f" at {facade}" if facade else ""))
    store.commit(d.change, d.snap.revision)
    return lines
