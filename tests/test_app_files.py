"""The files the app serves live in a private per-process folder, not in a fixed shared one."""
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from workbench.ui.app import CACHE_CLEANUP, build_app
from workbench.ui.session import Session, files_root

ROOT = Path(__file__).resolve().parent.parent


def test_the_files_folder_is_private_and_not_a_planted_one(tmp_path):
    fixed = Path(tempfile.gettempdir()) / "quant-workbench-app"
    planted = not fixed.exists() and not fixed.is_symlink()
    if planted:     # what another user of the host could leave there
        os.symlink(tmp_path, fixed)
    try:
        root = files_root()
        assert root.is_dir() and not root.is_symlink() and root != fixed
        st = os.stat(root)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        session = Session()
        files = session.files_dir()
        assert files.parent == root and stat.S_IMODE(os.stat(files).st_mode) == 0o700
        assert list(tmp_path.iterdir()) == []          # nothing went where the link points
        session.close()
        assert not files.exists()
    finally:
        if planted:
            fixed.unlink()


def test_the_files_folder_is_removed_at_exit():
    code = ("from workbench.ui.session import Session, files_root\n"
            "s = Session(); (s.files_dir() / 'r.json').write_text('{}'); print(files_root())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    root = Path(out.stdout.strip().splitlines()[-1])
    assert root.name.startswith("quant-workbench-app-") and not root.exists()


def test_gradio_cleans_its_cache(tiny_checkpoints):
    demo = build_app(default_model=tiny_checkpoints["llama"])
    assert demo.delete_cache == CACHE_CLEANUP
