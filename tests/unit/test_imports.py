"""The pure core imports no kernel, FUSE, database, socket or async library.

Each check runs in a fresh interpreter so that other tests' imports do not count.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HEAVY = ("pyroute2", "iptc", "pyfuse3", "sqlite3", "trio")


def loaded_after(imports: str, watch: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys, json; import {imports}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(watch)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def test_model_and_allocator_import_nothing_heavy_not_even_socket():
    assert loaded_after("fused.model, fused.allocator", HEAVY + ("socket", "_socket")) == []


def test_pure_core_with_rules_imports_no_kernel_fuse_db_or_trio():
    # fused.rules -> fused.config -> pydantic, which pulls `socket` in through the
    # standard library (importlib.metadata -> email.utils); only these are checked:
    assert loaded_after("fused.model, fused.allocator, fused.rules", HEAVY) == []


def test_the_checker_sees_what_is_imported():
    # the check above must be able to fail
    assert loaded_after("sqlite3, fused.model", HEAVY) == ["sqlite3"]


@pytest.mark.parametrize("mod", ["fused.oci", "fused.config"])
def test_oci_and_config_import_no_kernel_fuse_db_or_trio(mod):
    assert loaded_after(mod, HEAVY) == []


def test_file_server_imports_only_the_standard_library():
    # the process that answers FUSE requests starts fast and has little that can crash
    heavy = HEAVY + ("pydantic", "dns", "fused.render", "fused.model")
    code = (
        "import sys, json; import fused.fs.server, fused.fs.handlers, fused.fs.wire; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2','iptc','pyfuse3','sqlite3','trio','pydantic','dns') "
        "or m in ('fused.render','fused.model','fused.graph'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == [], heavy
