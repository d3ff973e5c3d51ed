"""State drift: what the runtimes run, against what tether has recorded.

Two ways they part, both invisible without this:

- a container runs while tether has it stopped, or never heard of it: its
  createRuntime hook did not run (podman did not read tether's hooks.d files,
  `podman start` without the `--hooks-dir` its `run` had, a bundle without
  the hooks). It has no network from tether and stale files.
- tether has a container running that its runtime no longer runs: its
  poststop never arrived (a crash, a `kill -9` of the runtime, a reboot).

`compare` is pure; `runtime_of` and `listing` read /proc and run the runtime.
Which runtime to ask is learnt at registration: the hook's parent is the
runtime (runc, for podman too), and its `--root` says where its list lives.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

RUNTIMES = {"runc": "/run/runc", "crun": "/run/crun"}  # name: default state root for root
LIVE = ("created", "running", "paused")
# global options that take a separate value (runc's, crun's)
VALUE_OPTIONS = {"--log", "--log-format", "--criu", "--rootless", "--cgroup-manager", "--log-level"}


def runtime_command(argv: list[str], exe: str) -> list[str]:
    """[exe, "--root", ROOT]: the command whose `list` shows a container that
    the runtime running as `argv` (its /proc cmdline) started; [] when it is
    no runtime we know."""
    exe = exe.removesuffix(" (deleted)")  # upgraded while it ran: the new binary has the path
    name = os.path.basename(exe)
    if name not in RUNTIMES:
        return []
    root = RUNTIMES[name]
    args = iter(argv[1:])
    for a in args:
        if a == "--root":
            root = next(args, root)
        elif a.startswith("--root="):
            root = a.split("=", 1)[1]
        elif a in VALUE_OPTIONS:
            next(args, None)
        elif not a.startswith("-"):
            break  # the subcommand: global options end here
    return [exe, "--root", os.path.normpath(root)]


def runtime_of(ppid: object) -> list[str]:
    """The runtime command of the hook's parent process (see runtime_command)."""
    if not isinstance(ppid, int) or isinstance(ppid, bool) or ppid <= 1:
        return []
    try:
        exe = os.readlink(f"/proc/{ppid}/exe")
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            argv = f.read(1 << 16).decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []
    return runtime_command(argv, exe)


@dataclass(frozen=True)
class Seen:
    """A container as its runtime lists it."""

    id: str
    status: str
    annotations: dict
    bundle: str = ""


def parse_listing(text: str) -> list[Seen]:
    """`runc list --format json` (which prints null for none)."""
    items = json.loads(text) or []
    return [
        Seen(str(c.get("id", "")), str(c.get("status", "")), c.get("annotations") or {}, str(c.get("bundle", "")))
        for c in items
        if isinstance(c, dict)
    ]


@dataclass(frozen=True)
class Drift:
    name: str
    id: str
    runtime: str  # e.g. "runc --root /run/runc"
    problem: str
    why: str

    def line(self) -> str:
        return f"{self.name}: {self.problem}: {self.why}"


def _shown(cmd: list[str]) -> str:
    return " ".join([os.path.basename(cmd[0]), *cmd[1:]])


HOOK_DID_NOT_RUN = (
    "its createRuntime hook did not run at its last start (podman: tether's hooks.d files are not in a directory "
    "podman reads, see `tether doctor`; runc: config.json has no tether hook, see `tether oci patch`); "
    "stop it and start it again with the hooks"
)


def compare(
    containers: list[dict], listings: dict[tuple[str, ...], list[Seen]], ours=lambda seen: True, since: float | None = None
) -> list[Drift]:
    """Drift between tether's containers (records with name, id, state,
    runtime, and changed: the time of their last start or stop) and each
    runtime's listing (keyed by its command). `ours(seen)` tells whether an
    unknown container with io.tether.* annotations belongs to this tether
    (its hooks name this config). A record that changed after `since` (when
    the listings began) is left out: it was starting or stopping meanwhile."""
    if since is not None:
        containers = [c for c in containers if (c.get("changed") or 0) <= since]
    by_id: dict[str, dict] = {}
    for c in containers:  # an id runc reused: the running record is the one it lists
        if c["id"] not in by_id or c["state"] == "running":
            by_id[c["id"]] = c
    out: list[Drift] = []
    for cmd, seen in sorted(listings.items()):
        shown = _shown(list(cmd))
        live = {s.id: s for s in seen}
        for s in seen:
            if s.status not in LIVE:
                continue
            c = by_id.get(s.id)
            if c is not None and c.get("runtime") and tuple(c["runtime"]) != cmd:
                c = None  # the same id under another runtime root: another container
            if c is not None and c["state"] != "running":
                out.append(Drift(c["name"], s.id, shown, f"{shown} has it {s.status}, tether has it stopped", HOOK_DID_NOT_RUN))
            elif c is None and s.id not in by_id and any(k.startswith("io.tether.") for k in s.annotations) and ours(s):
                name = s.annotations.get("io.tether.name") or s.id
                out.append(Drift(str(name), s.id, shown, f"{shown} has it {s.status}, tether never registered it", HOOK_DID_NOT_RUN))
        for c in containers:
            if c["state"] != "running" or tuple(c.get("runtime") or ()) != cmd:
                continue
            s = live.get(c["id"])
            if s is None:
                out.append(Drift(
                    c["name"], c["id"], shown, f"tether has it running, {shown} does not know it",
                    "its poststop hook never arrived (the runtime was killed, or the host rebooted); "
                    "tether marks it stopped at its next reconcile: `systemctl reload tether-fused` (SIGHUP)",
                ))
            elif s.status not in LIVE:
                out.append(Drift(
                    c["name"], c["id"], shown, f"tether has it running, {shown} has it {s.status}",
                    f"its process exited and it was not deleted yet: `{shown} delete {c['id']}` runs its poststop",
                ))
    return out


def claims(spec: dict, config: str | None, default: str) -> bool:
    """Whether an unregistered container (its config.json) is this tether's to
    report: its tether-hook entries name this config, or it has none at all
    (then nobody else's claim is better)."""
    entries = [
        h for hs in (spec.get("hooks") or {}).values() if isinstance(hs, list)
        for h in hs if isinstance(h, dict) and os.path.basename(str(h.get("path", ""))) == "tether-hook"
    ]
    if not entries:
        return True
    for h in entries:
        args = [str(a) for a in h.get("args") or []]
        named = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
        named = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), named)
        if os.path.realpath(named or default) == os.path.realpath(config or default):
            return True
    return False


def claimed_by(config: str | None, default: str):
    """`ours` for compare: an unregistered container is this tether's to
    report when its config.json (read from its bundle) `claims` says so."""
    from .oci import read_spec

    def ours(seen: Seen) -> bool:
        spec = read_spec(seen.bundle)
        return not spec or claims(spec, config, default)

    return ours


async def listings(cmds: set[tuple[str, ...]], timeout: float = 2.5) -> dict[tuple[str, ...], list[Seen]]:
    """Each runtime's `list`, for the roots tether has seen and runc's default
    (where plain runc and podman's runc keep theirs); a runtime that fails or
    hangs is left out (its containers are not judged)."""
    import shutil

    import trio

    cmds = {c for c in cmds if os.access(c[0], os.X_OK)}  # a runtime removed since: nothing to ask
    for name, root in RUNTIMES.items():
        found = shutil.which(name)
        if found and os.path.isdir(root):
            cmds.add((os.path.realpath(found), "--root", root))
    out: dict[tuple[str, ...], list[Seen]] = {}

    async def one(cmd: tuple[str, ...]) -> None:
        try:
            p = await trio.run_process([*cmd, "list", "--format", "json"], capture_stdout=True, capture_stderr=True, check=False)
        except OSError:
            return
        if p.returncode == 0:
            try:
                out[cmd] = parse_listing(p.stdout.decode(errors="replace"))
            except ValueError:
                pass

    with trio.move_on_after(timeout):  # one deadline for all: `tether ps` waits on it
        async with trio.open_nursery() as nursery:
            for cmd in sorted(cmds):
                nursery.start_soon(one, cmd)
    return out
