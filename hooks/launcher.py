"""The fast `tether-hook` launcher, written in place of pip's console script.

    python -m hooks.launcher [BIN_DIR]     (default: the directory of sys.executable)

pip's console script starts the interpreter with `site` (the venv's
site-packages, every .pth file, the editable-install finder) although the
hook needs only the standard library and this checkout. The launcher starts
it with `-I -S` (isolated, no site) and puts the one directory that holds
`hooks/` and `fused/` on sys.path itself: 3-4 ms less per hook run, two hook
runs per container. runc runs hooks with an empty environment, which -I
ignores anyway.

A later `pip install` writes the console script back; it works the same,
only slower. `make test` and packaging/install.sh call this after pip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MARK = "# tether-hook launcher"


def text(python: str, root: str) -> str:
    """The launcher for interpreter `python`, importing hooks/ from `root`."""
    return (
        f"#!{python} -IS\n"
        f"{MARK}: python -m hooks.launcher wrote it (-I -S: no site, only the standard library and {root})\n"
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from hooks.hook import main\n"
        "main()\n"
    )


def write(bin_dir: Path, python: str | None = None) -> Path:
    """Write BIN_DIR/tether-hook atomically (0755) and return its path."""
    root = str(Path(__file__).resolve().parent.parent)
    python = python or str(bin_dir / "python")
    target = bin_dir / "tether-hook"
    tmp = target.with_name(".tether-hook.tmp")
    tmp.write_text(text(python, root))
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def main() -> None:
    bin_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.executable).parent
    if not (bin_dir / "python").exists():
        sys.exit(f"hooks.launcher: no python in {bin_dir}: pass the venv's bin directory")
    print(f"wrote {write(bin_dir)}")


if __name__ == "__main__":
    main()
