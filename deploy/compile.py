"""The compiled build: the engine, the trigger machines, the journey facts and intake compiled
with mypyc from the same source, the pure-Python modules being the reference and the fallback.

``python deploy/compile.py`` (``make compiled``) refreshes a copy of the packages in
``build/compiled`` and compiles it there, never beside the source: an edited ``.py`` is never
shadowed by a stale compiled module in the editable install. Use it with
``PYTHONSAFEPATH=1 PYTHONPATH=build/compiled`` (``make bench`` does). mypyc runs only when a
source it reads changed since the last build.

``python deploy/compile.py --in-place DIR`` compiles the packages installed in ``DIR`` (a
site-packages; the Docker image's build stage).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "processors/core/engine/engine.py",
    "processors/core/engine/rules.py",
    "processors/core/engine/state.py",
    "processors/core/engine/state_format.py",
    "processors/core/trigger.py",
    "processors/core/segment.py",
    "processors/core/events.py",
    "streams/intake.py",
    "streams/pipeline.py",
    "streams/steps.py",
    "streams/episodes.py",
    "streams/state/users.py",
    "streams/state/cache.py",
    "streams/state/checkpoint.py",
]
PACKAGES = ["processors", "streams", "schemas"]
LINKED = ["examples", "deploy"]  # read through REPO_ROOT (campaigns, the broker's pom)


def mypyc(directory: Path) -> None:
    """Compile :data:`MODULES` in ``directory`` (extension modules next to their ``.py``)."""
    mypyc_bin = Path(sys.executable).with_name("mypyc")
    argv = [str(mypyc_bin)] if mypyc_bin.exists() else [sys.executable, "-m", "mypyc"]
    subprocess.run(
        [*argv, "--ignore-missing-imports", *MODULES],
        cwd=directory,
        check=True,
        env={**os.environ, "MYPYC_OPT_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
    )


def refresh(into: Path) -> bool:
    """Make ``into``'s copy of the packages equal the source; True when a file changed."""
    changed = False
    for package in PACKAGES:
        src_root, dst_root = ROOT / package, into / package
        wanted: set[Path] = set()
        for src in src_root.rglob("*"):
            if "__pycache__" in src.parts or src.is_dir() or src.suffix == ".so":
                continue
            rel = src.relative_to(ROOT)
            wanted.add(rel)
            dst = into / rel
            if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                changed = True
        for dst in list(dst_root.rglob("*")):
            if "__pycache__" in dst.parts or dst.is_dir() or dst.suffix == ".so":
                continue
            if dst.relative_to(into) not in wanted:
                dst.unlink()
                changed = True
    for name in LINKED:
        link = into / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    return changed


def drop_stale_extensions(into: Path) -> None:
    """Remove the extension of a module no longer in :data:`MODULES` (it would shadow its .py)."""
    for ext in into.rglob("*.so"):
        if "__mypyc" in ext.name:
            continue  # the shared runtime of the compiled modules
        source = ext.with_name(ext.name.split(".", 1)[0] + ".py").relative_to(into)
        if str(source) not in MODULES:
            ext.unlink()


def compiled_sources_changed(into: Path, stamp: Path) -> bool:
    if not stamp.exists() or stamp.read_text() != "\n".join(MODULES):
        return True
    built = stamp.stat().st_mtime
    reads = [*MODULES, *(str(p.relative_to(into)) for p in (into / "processors/core").glob("*.py"))]
    return any((into / m).stat().st_mtime > built for m in reads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=ROOT / "build" / "compiled")
    parser.add_argument("--in-place", type=Path, help="compile the packages installed here")
    args = parser.parse_args()
    if args.in_place is not None:
        mypyc(args.in_place)
        return 0
    into: Path = args.into
    into.mkdir(parents=True, exist_ok=True)
    refresh(into)
    drop_stale_extensions(into)
    stamp = into / ".compiled"
    if compiled_sources_changed(into, stamp):
        print(f"mypyc: compiling {len(MODULES)} modules into {into}", flush=True)
        mypyc(into)
        stamp.write_text("\n".join(MODULES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
