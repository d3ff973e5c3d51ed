"""tether: the command line. A client of tether-fused, plus `oci patch`."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

from . import config as config_mod
from . import model, oci, render
from .errors import TetherError
from .protocol import DaemonError, Unreachable, request


class CliError(Exception):
    pass


class UsageError(CliError):
    """A command typed wrong (exit 2, as argparse's own)."""


def _when(ts: str | float | None) -> str:
    """An RFC 3339 time from the daemon (epoch seconds from a daemon of before
    RFC 3339), in local time."""
    if not ts:
        return "-"
    when = datetime.fromtimestamp(ts) if isinstance(ts, (int, float)) else datetime.fromisoformat(ts).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S")


# `ps --filter KEY=VALUE`, as podman's: the values of one key OR, keys AND
PS_FILTERS = "state=running, state=stopped, name=NAME"


def ps_filters(specs: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if key not in ("state", "name") or not sep or not value:
            why = f"unknown key {key!r}" if sep and key not in ("state", "name") else "use KEY=VALUE"
            raise UsageError(f"--filter {spec!r}: {why}; valid filters: {PS_FILTERS}")
        if key == "state" and value not in (model.RUNNING, model.STOPPED):
            raise UsageError(f"--filter {spec!r}: unknown state {value!r}; valid filters: {PS_FILTERS}")
        out.setdefault(key, set()).add(value)
    return out


def ps_select(items: list[dict], show_all: bool, filters: dict[str, set[str]]) -> list[dict]:
    """Running containers, or all of them; a state filter implies all (as
    podman's and docker's status filter)."""
    states = filters.get("state") or ({model.RUNNING, model.STOPPED} if show_all else {model.RUNNING})
    names = filters.get("name")
    return [c for c in items if c["state"] in states and (names is None or c["name"] in names)]


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) if c not in (None, "", []) else "-" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _ps_rows(items: list[dict]) -> str:
    hosts = any("host" in c for c in items)  # several hosts: where each runs
    return table(
        ["name", "id", "state", *(["host"] if hosts else []), "ip", "ports", "links", "stopped since"],
        [
            [
                c["name"],
                c["id"][:24],
                c["state"],
                *([c.get("host") or "-"] if hosts else []),
                c["ip"],
                ",".join(c["published"]),
                ",".join(c["links"]),
                _when(c["stopped_at"]) if c["state"] == "stopped" else "-",
            ]
            for c in items
        ],
    )


def _plain(key: str, value: object) -> str:
    """A record's value as text: no Python reprs, times in local time."""
    if value in (None, "", [], {}):
        return "-"
    if key.endswith("_at") or key == "since":
        return _when(value)  # type: ignore[arg-type]
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _inspect_text(c: dict) -> str:
    fields = [(k, _plain(k, v)) for k, v in c.items() if k not in ("leases", "files")]
    width = max((len(k) for k, _ in fields), default=0) + 1
    out = [f"{k + ':':<{width}} {v}" for k, v in fields]
    if c.get("leases"):
        out.append("leases:")
        out += ["  " + line for line in _leases_text(c["leases"]).splitlines()]
    for fname, text in (c.get("files") or {}).items():
        out.append(f"--- {fname}")
        out.append(text.rstrip("\n") or "(empty)")
    return "\n".join(out)


def _leases_text(items: list[dict]) -> str:
    return table(
        ["kind", "lease", "maps", "name", "state", "last used"],
        [
            [l["kind"], l["lease"], l["maps"], l["name"], l["state"], "now" if l["state"] == "running" else _when(l["stopped_at"])]
            for l in items
        ],
    )


def _printer(op: str):
    return {
        "ps": _ps_rows,
        "inspect": _inspect_text,
        "leases": _leases_text,
        "rm": lambda r: f"removed {r['name']}; freed {', '.join(r['freed']) or 'nothing'}",
        "link_ls": _links_text,
        "move": _move_text,
        "link_add": lambda r: f"added {r['link']} ({r['state']}{' at ' + r['address'] if r['address'] else ''})",
        "link_retarget": lambda r: f"{r['link']} (was {r['previous']})",
        "link_rm": lambda r: f"removed {r['link']}",
    }[op]


def _move_text(r: dict) -> str:
    """A line, then what moved: each link and host port in its one notation."""
    head = f"moved {r['old']} to {r['new']}: {r['links']} link(s), {len(r['ports'])} host port(s)"
    addresses = r.get("addresses", [])
    if addresses:  # veth-move, reassign
        head += f", {len(addresses)} address(es)"
    lines = r["moved"] + r["ports"] + [f"{a['ip']}: {a['from']}->{a['to']}" for a in addresses]
    return "\n".join([head] + ["  " + x for x in lines])


def _links_text(items: list[dict]) -> str:
    return table(
        ["consumer", "alias", "target", "state", "address", "ports"],
        [[l["consumer"], l["alias"], l["target"], l["state"], l["address"], ",".join(l["ports"])] for l in items],
    )


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p = argparse.ArgumentParser(prog="tether", parents=[common], description="tether: sticky addresses and links that follow")
    p.add_argument("--version", action="version", version=f"tether {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sp = sub.add_parser("ps", parents=[common], help="list containers (running ones; -a: all)")
    sp.add_argument("-a", "--all", action="store_true", help="stopped containers too")
    sp.add_argument("-q", "--quiet", action="store_true", help="names only, one per line")
    sp.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help=f"{PS_FILTERS}; repeatable: one key's values OR, different keys AND")
    sp = sub.add_parser("inspect", parents=[common], help="one container: leases, links, files")
    sp.add_argument("name")
    sub.add_parser("leases", parents=[common], help="address and port leases")
    sp = sub.add_parser("rm", parents=[common], help="remove stopped containers and free their leases")
    sp.add_argument("names", nargs="+", metavar="NAME")
    oci_p = sub.add_parser("oci", parents=[common], help="OCI bundle helpers")
    oci_sub = oci_p.add_subparsers(dest="oci_cmd", required=True, metavar="SUBCOMMAND")
    sp = oci_sub.add_parser("patch", parents=[common], help="add tether's hooks and annotations to a runc bundle")
    sp.add_argument("bundle", help="bundle directory (holding config.json)")
    sp.add_argument("--name", required=True, help="the container's tether name (RFC 1123 label)")
    sp.add_argument("--link", action="append", default=[], metavar="T[:A]", help="link to target T as alias A")
    sp.add_argument("--expose", action="append", default=[], metavar="P[/proto]", help="a port it listens on")
    sp.add_argument("--publish", action="append", default=[], metavar="[H:]P[/proto]", help="publish a port on the host")
    sp.add_argument("--no-mounts", action="store_true",
                    help="hooks and annotations only: the createRuntime hook mounts the served files itself")
    sp = oci_sub.add_parser("hooks-dir", parents=[common], help="write podman's hooks.d files (oci-hooks(5)) into DIR")
    sp.add_argument("dir", metavar="DIR", nargs="?",
                    help="default: the first directory podman reads them from ([engine] hooks_dir of its "
                    "containers.conf, else /usr/share/containers/oci/hooks.d)")
    sp = sub.add_parser("move", parents=[common], help="failover: links and published ports of OLD go to NEW")
    sp.add_argument("old")
    sp.add_argument("new")
    link = sub.add_parser("link", parents=[common], help="links: add, rm, ls, retarget")
    lsub = link.add_subparsers(dest="link_cmd", required=True, metavar="SUBCOMMAND")
    sp = lsub.add_parser("add", parents=[common], help="CONSUMER reaches TARGET as ALIAS")
    sp.add_argument("consumer")
    sp.add_argument("target")
    sp.add_argument("--alias", help="default: the target's name")
    sp = lsub.add_parser("rm", parents=[common], help="remove a link")
    sp.add_argument("consumer")
    sp.add_argument("alias")
    lsub.add_parser("ls", parents=[common], help="every link, with its state and address")
    sp = lsub.add_parser("retarget", parents=[common], help="point CONSUMER's ALIAS at NEWTARGET")
    sp.add_argument("consumer")
    sp.add_argument("alias")
    sp.add_argument("target", metavar="NEWTARGET")
    sp.add_argument("--allow-dangling", action="store_true",
                    help="NEWTARGET need not be registered yet (the link has no address until it is)")
    sub.add_parser(
        "doctor",
        parents=[common],
        help="check what tether needs (kernel, FUSE, firewall, bridge, daemon, store, mount, each running "
        "container's files), one line each with the fix",
        description="Read-only checks, one line each: ok, warn (usable, worth knowing) or FAIL with the fix. "
        "Exit status 0 iff nothing failed.",
    )
    sub.add_parser(
        "demo",
        help="a guided run with real runc containers on an isolated setup (root)",
        description="db, db2 and web in real runc containers, with their own temporary config, daemon, bridge "
        "and chains (not --config's), all removed at the end. Root only.",
    )
    return p


def _request_of(a: argparse.Namespace) -> tuple[str, dict]:
    if a.cmd == "link":
        if a.link_cmd == "ls":
            return "link_ls", {}
        args = {"consumer": model.check_label(a.consumer, "consumer name")}
        if a.link_cmd == "add":
            args["target"] = model.check_label(a.target, "target name")
            args["alias"] = model.check_label(a.alias or a.target, "alias")
        elif a.link_cmd == "rm":
            args["alias"] = model.check_label(a.alias, "alias")
        else:
            args["alias"] = model.check_label(a.alias, "alias")
            args["target"] = model.check_label(a.target, "target name")
            if a.allow_dangling:
                args["allow_dangling"] = True
        return f"link_{a.link_cmd}", args
    if a.cmd == "move":
        return "move", {"old": model.check_label(a.old, "container name"), "new": model.check_label(a.new, "container name")}
    return a.cmd, ({"name": model.check_label(a.name)} if hasattr(a, "name") else {})


def _known_link_env(cfg: config_mod.Config, links: list[model.LinkSpec]) -> dict[str, str]:
    """DOCKER_LINK_PORT_<ALIAS> for links whose target the daemon knows now."""
    env = {}
    for link in links:
        try:
            target = request(str(cfg.socket_path), "inspect", {"name": link.target}, timeout=2.0)
        except (DaemonError, Unreachable):
            continue
        ports = model.parse_expose(",".join(target.get("expose", [])))
        env[render.env_var(link.alias)] = render.env_value(tuple(ports))
    return env


def _hook_path() -> str:
    beside = Path(sys.executable).parent / "tether-hook"
    if beside.exists():
        return str(beside)
    found = shutil.which("tether-hook")
    if not found:
        raise CliError("tether-hook is not installed next to tether: reinstall tether")
    return str(Path(found).absolute())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:
        return "unknown"


def run(argv: list[str]) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.cmd is None:  # a plain `tether`: the command list, as podman and docker print it
        p.print_help()
        return 0
    as_json = getattr(a, "json", False)
    if a.cmd == "demo":  # its own isolated config and daemon: no request to a configured one
        from . import demo

        return demo.main([])
    if a.cmd == "doctor":  # checks the daemon among the rest: no request first; reports a bad config itself
        from . import doctor

        return doctor.main(getattr(a, "config", None), as_json)
    try:
        filters = ps_filters(a.filter) if a.cmd == "ps" else {}
        cfg = config_mod.load(getattr(a, "config", None))
        if a.cmd == "oci" and a.oci_cmd == "hooks-dir":
            from . import podman

            dirs = podman.hooks_dirs()
            if not a.dir and not dirs:
                raise CliError("podman's containers.conf sets hooks_dir = []: podman reads no hooks.d files; "
                               "name a directory in hooks_dir, then pass it as DIR")
            where = a.dir or dirs[0]
            try:
                written = podman.write_hooks_dir(Path(where), _hook_path(), cfg.source)
            except OSError as e:
                raise CliError(f"cannot write hooks into {where}: {e.strerror or e}") from None
            files = [{"path": str(p), "changed": changed} for p, changed in written]
            print(json.dumps({"files": files}, indent=2) if as_json else "\n".join(
                f"{'wrote' if f['changed'] else 'unchanged'} {f['path']}" for f in files))
            return 0
        if a.cmd == "oci":
            model.check_label(a.name)
            links = model.parse_links(",".join(a.link), "--link")
            model.parse_expose(",".join(a.expose), "--expose")
            model.parse_publish(",".join(a.publish), "--publish")
            oci.patch(
                Path(a.bundle),
                a.name,
                hook=_hook_path(),
                config=cfg.source,
                links=[str(l) for l in links],
                expose=a.expose,
                publish=a.publish,
                fs_dir=cfg.fs_dir,
                dns=cfg.dns.enabled,
                mounts=not a.no_mounts,
                env=_known_link_env(cfg, links),
            )
            if not as_json:
                print(f"patched {Path(a.bundle) / 'config.json'} for {a.name}")
            return 0
        if a.cmd == "rm":
            return _rm_many(cfg, [model.check_label(n) for n in a.names], as_json)
        op, args = _request_of(a)
        result = request(str(cfg.socket_path), op, args)
        if op == "ps":
            try:
                health = request(str(cfg.socket_path), "health", {})
            except DaemonError:  # a daemon from before `health`: nothing to add
                health = {"files": "ok"}
            if health.get("files") != "ok":  # stderr: --json stays parseable
                print(f"tether: warning: served files are broken: {health['files']}; "
                      "running containers keep theirs, new ones cannot start: restart tether-fused", file=sys.stderr)
            try:  # what the runtimes run and tether does not (or the reverse): whatever the selection
                drifted = request(str(cfg.socket_path), "drift", {}, timeout=5.0)
            except (DaemonError, Unreachable):  # a daemon from before `drift`, or a runtime that hangs
                drifted = []
            for d in drifted:
                print(f"tether: warning: {d['name']}: {d['problem']}: {d['why']}", file=sys.stderr)
            for line in _check_files(cfg, result):
                print(f"tether: warning: {line}", file=sys.stderr)
            result = ps_select(result, a.all, filters)
            if a.quiet and not as_json:  # with --json: a list of names, below
                for c in result:
                    print(c["name"])
                return 0
            if a.quiet:
                result = [c["name"] for c in result]
    except UsageError as e:
        print(f"tether: {e}", file=sys.stderr)
        return 2
    except (TetherError, CliError, oci.PatchError, DaemonError, Unreachable) as e:
        print(f"tether: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else _printer(op)(result))
    if not as_json and isinstance(result, dict):  # a change that went through, with what did not (stderr)
        for w in result.get("warnings") or ():
            print(f"tether: warning: {w}", file=sys.stderr)
    return 0


WARNED = 10  # file warnings `ps` prints before pointing at `tether doctor`


def _check_files(cfg: config_mod.Config, items: list[dict]) -> list[str]:
    """Read each running container's served files from inside it (see
    container_files); set each item's "served_files" (None: not running here),
    and return the warnings: dead or stale files, or an /etc/hosts not tether's."""
    from . import container_files as cf

    try:
        me = cfg.cluster.host_name if cfg.clustered else None
    except ValueError:  # no usable host name: the daemon said so at its start
        return []
    running = [cf.Container(c["name"], c["id"], c["pid"]) for c in items
               if c["state"] == model.RUNNING and c.get("pid") and (me is None or c.get("host") == me)]

    def served(name: str) -> dict[str, bytes] | None:
        try:
            files = request(str(cfg.socket_path), "inspect", {"name": name}, timeout=2.0)["files"]
        except (DaemonError, Unreachable, KeyError, TypeError):
            return None
        return {f: text.encode() for f, text in files.items()}

    found = {f.name: f for f in cf.check(cf.host_mount(cfg.run_dir), running, served)}
    for c in items:
        c["served_files"] = found[c["name"]].as_dict() if c["name"] in found else None
    bad = [f for f in found.values() if f.state in (*cf.PROBLEMS, cf.NOT_TETHERS)]
    lines = [f"{f.name}: served files {f.state}: {f.detail}: {f.fix}" for f in bad[:WARNED]]
    if len(bad) > WARNED:
        lines.append(f"and {len(bad) - WARNED} more container(s) like these: `tether doctor` counts them")
    return lines


def _rm_many(cfg: config_mod.Config, names: list[str], as_json: bool) -> int:
    """`tether rm A B C`: each name on its own; one line per failure, exit 1 if any."""
    results, failed = [], 0
    for name in names:
        try:
            r = request(str(cfg.socket_path), "rm", {"name": name})
        except DaemonError as e:
            print(f"tether: {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append(r)
        if not as_json:
            print(_printer("rm")(r))
    if as_json:
        print(json.dumps(results, indent=2, sort_keys=True))
    return 1 if failed else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
