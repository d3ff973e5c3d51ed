"""The pure core imports no kernel, FUSE, database, socket or async library,
and the hook's side (hooks/, fused.protocol) nothing but the standard library.

Each check runs in a fresh interpreter so that other tests' imports do not count.
"""
from __future__ import annotations

import ast
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
    assert loaded_after("fused.model, fused.allocator, fused.rules", HEAVY) == []


def test_rules_graph_and_render_take_plain_settings_not_the_config():
    # rules.build takes a RuleSettings: the pure core needs no pydantic
    code = (
        "import sys, json; import fused.rules, fused.graph, fused.render; "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'fused.config' or m.split('.')[0] == 'pydantic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


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


# --- the hook's side: the standard library only --------------------------------

# what tether-hook may load: hooks/ and, of fused/, only the control protocol
HOOK_SIDE = "hooks.hook, hooks.mounts, fused.protocol"
FUSED_OK = {"fused", "fused.protocol"}


def not_stdlib_after(imports: str) -> list[str]:
    """Modules that `import {imports}` loads, in a fresh interpreter, that are
    neither the standard library nor hooks/ nor fused.protocol."""
    code = f"import sys; before = set(sys.modules); import {imports}; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = ast.literal_eval(out.stdout)
    return [
        m
        for m in loaded
        if not (m.split(".")[0] in sys.stdlib_module_names or m.split(".")[0] == "hooks" or m in FUSED_OK)
    ]


def test_the_hook_and_the_protocol_import_only_the_standard_library():
    assert not_stdlib_after(HOOK_SIDE) == []


def test_the_protocol_alone_loads_only_its_own_module_and_the_socket_primitive():
    # the hook imports it on every container start: no json, no socket module until a line is coded
    code = "import sys; before = set(sys.modules); import fused.protocol; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert set(ast.literal_eval(out.stdout)) <= {"__future__", "fused", "fused.protocol", "_socket"}


def test_the_errors_import_nothing():
    code = "import sys; before = set(sys.modules); import fused.errors; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert set(ast.literal_eval(out.stdout)) <= {"__future__", "fused", "fused.errors"}


@pytest.mark.parametrize("extra", ["fused.errors", "fused.model", "trio"])
def test_the_stdlib_checker_sees_what_is_not_the_standard_library(extra):
    # the check above must be able to fail
    assert extra in not_stdlib_after(f"{HOOK_SIDE}, {extra}")


# --- the launcher: python -I -S, this checkout on sys.path -------------------------

def test_the_launcher_runs_the_hook_without_site_and_ignores_the_environment(tmp_path):
    from hooks import launcher

    (tmp_path / "python").symlink_to(sys.executable)
    hook = launcher.write(tmp_path)
    assert hook.read_text().splitlines()[0] == f"#!{tmp_path / 'python'} -IS"
    # PYTHONPATH pointing at a module that would shadow the hook's is ignored (-I),
    # and the hook itself answers
    shadow = tmp_path / "shadow" / "hooks"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    out = subprocess.run(
        [str(hook), "bogus"], capture_output=True, text=True, cwd="/",
        env={"PYTHONPATH": str(shadow.parent)},
    )
    assert out.stderr == "tether-hook: unknown stage 'bogus': use createRuntime, prestart or poststop\n", out
    assert out.returncode == 1
    probe = subprocess.run(
        [str(tmp_path / "python"), "-IS", "-c", "import sys; print('site' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "False"
