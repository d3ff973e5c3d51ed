"""CLI conventions of podman and docker (no daemon needed)."""
from __future__ import annotations

import pytest

from fused import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tether ")


def test_plain_tether_prints_the_command_list(capsys):
    assert cli.run([]) == 0
    out = capsys.readouterr().out
    for cmd in ("ps", "inspect", "link", "move", "rm", "oci", "doctor", "demo"):
        assert cmd in out


def test_rm_checks_every_name_before_asking(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'run_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n')
    # a bad label among them: one line, exit 1, nothing asked of a daemon
    assert cli.run(["--config", str(cfg), "rm", "ok-name", "Bad_Name"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Bad_Name" in err
