"""tether: the command line. A client of tether-fused, plus `oci patch`."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hooks.protocol import DaemonError, Unreachable, request

from . import config as config_mod
from . import model, oci, render


class CliError(Exception):
    pass


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) if c not in (None, "", []) else "-" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _ps_rows(items: list[dict]) -> str:
    return table(
        ["name", "id", "state", "ip", "ports", "links", "stopped since"],
        [
            [
                c["name"],
                c["id"][:24],
                c["state"],
                c["ip"],
                ",".join(c.get("published", []) or c["publish"]),
                ",".join(c.get("links", [])),
                _when(c["stopped_at"]) if c["state"] == "stopped" else "-",
            ]
            for c in items
        ],
    )


def _inspect_text(c: dict) -> str:
    skip = ("leases", "files")
    out = [f"{k}: {v if v not in (None, '', []) else '-'}" for k, v in c.items() if k not in skip]
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
        "move": lambda r: (
            f"moved {r['old']} -> {r['new']}: {r['links']} link(s)"
            + (f", host ports {', '.join(r['ports'])}" if r["ports"] else "")
        ),
        "link_add": lambda r: _links_text([r]),
        "link_retarget": lambda r: f"{r['consumer']}: {r['alias']} now -> {r['target']} (was {r['previous']})",
        "link_rm": lambda r: f"{r['consumer']}: removed {r['alias']} -> {r['target']}",
    }[op]


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
    sub.add_parser("ps", parents=[common], help="list containers")
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
    sp = oci_sub.add_parser("hooks-dir", parents=[common], help="write podman's hooks.d files (oci-hooks(5)) into DIR")
    sp.add_argument("dir", metavar="DIR", help="e.g. /etc/containers/oci/hooks.d (podman's default for root)")
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
        help="check what tether needs (kernel, FUSE, firewall, bridge, daemon, store, mount), one line each with the fix",
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
        cfg = config_mod.load(getattr(a, "config", None))
        if a.cmd == "oci" and a.oci_cmd == "hooks-dir":
            from . import podman

            try:
                written = podman.write_hooks_dir(Path(a.dir), _hook_path(), cfg.source)
            except OSError as e:
                raise CliError(f"cannot write hooks into {a.dir}: {e.strerror or e}") from None
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
    except (config_mod.ConfigError, model.InputError, CliError, oci.PatchError, DaemonError, Unreachable) as e:
        print(f"tether: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else _printer(op)(result))
    return 0


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
