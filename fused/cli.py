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
from . import model, oci


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
    out = [f"{k}: {v if v not in (None, '', []) else '-'}" for k, v in c.items() if k not in ("leases",)]
    if c.get("leases"):
        out.append("leases:")
        out += ["  " + line for line in _leases_text(c["leases"]).splitlines()]
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
    }[op]


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p = argparse.ArgumentParser(prog="tether", parents=[common], description="tether: sticky addresses and links that follow")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("ps", parents=[common], help="list containers")
    sp = sub.add_parser("inspect", parents=[common], help="one container: leases, links, files")
    sp.add_argument("name")
    sub.add_parser("leases", parents=[common], help="address and port leases")
    sp = sub.add_parser("rm", parents=[common], help="remove a stopped container and free its leases")
    sp.add_argument("name")
    oci_p = sub.add_parser("oci", parents=[common], help="OCI bundle helpers")
    oci_sub = oci_p.add_subparsers(dest="oci_cmd", required=True, metavar="SUBCOMMAND")
    sp = oci_sub.add_parser("patch", parents=[common], help="add tether's hooks and annotations to a runc bundle")
    sp.add_argument("bundle", help="bundle directory (holding config.json)")
    sp.add_argument("--name", required=True, help="the container's tether name (RFC 1123 label)")
    return p


def _hook_path() -> str:
    beside = Path(sys.executable).parent / "tether-hook"
    if beside.exists():
        return str(beside)
    found = shutil.which("tether-hook")
    if not found:
        raise CliError("tether-hook is not installed next to tether: reinstall tether")
    return str(Path(found).absolute())


def run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    as_json = getattr(a, "json", False)
    try:
        cfg = config_mod.load(getattr(a, "config", None))
        if a.cmd == "oci":
            model.check_label(a.name)
            oci.patch(Path(a.bundle), a.name, hook=_hook_path(), config=cfg.source)
            if not as_json:
                print(f"patched {Path(a.bundle) / 'config.json'} for {a.name}")
            return 0
        args = {"name": model.check_label(a.name)} if hasattr(a, "name") else {}
        result = request(str(cfg.socket_path), a.cmd, args)
    except (config_mod.ConfigError, model.InputError, CliError, oci.PatchError, DaemonError, Unreachable) as e:
        print(f"tether: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else _printer(a.cmd)(result))
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
