"""The Makefile as users run it: from an activated virtualenv as well as system Python (issue 13).

The min-transformers env must see what `make install` put into the *calling* environment (a venv's own
site-packages, not only the base interpreter's), and `make test` installs only when something changed.
"""

import hashlib
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIN_TRANSFORMERS = "5.17.0"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _env():
    # a clean make: nothing inherited from a `make test` that may be running this suite
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env.pop("PYTHONPATH", None)
    return env


def _make(*args, cwd=ROOT, timeout=60):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _venv(path):
    """A venv like `python3 -m venv v` after `make install`: the packages live in the venv's own site-packages
    (here: a .pth that adds this interpreter's site dirs, so torch is not reinstalled) and a module that only
    this venv has. No --system-site-packages, so the base interpreter alone does not see them."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    py = path / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (purelib / "_installed.pth").write_text("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))
    (purelib / "hfa_only_in_this_venv.py").write_text("WHERE = 'venv'\n")
    return py


def _version(py, module):
    return subprocess.run([str(py), "-c", f"import {module}; print({module}.__version__)"], check=True,
                          capture_output=True, text=True, env=_env(), timeout=60).stdout.strip()


@pytest.mark.slow
def test_min_env_from_inside_a_venv_sees_the_venvs_packages_and_the_pinned_transformers(tmp_path):
    """The recipe that broke: from inside a venv, `.venv-min` got the base interpreter's packages, not the
    venv's (ModuleNotFoundError: torch). Now it sees the venv's, torch included, and transformers 5.17."""
    outer = _venv(tmp_path / "v")
    outer_transformers = _version(outer, "transformers")
    min_env = tmp_path / "min"
    proc = _make("min-env", f"PY={outer}", f"MIN_ENV={min_env}", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    py = min_env / "bin" / "python"
    out = subprocess.run(
        [str(py), "-c", "import hfa_only_in_this_venv as m, torch, transformers, huggingface_hub, hf_efficient_attn; "
                        "print(m.WHERE, transformers.__version__, huggingface_hub.__version__.split('.')[0])"],
        cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["venv", MIN_TRANSFORMERS, "1"]
    # the pinned transformers went into the throwaway env only
    assert _version(outer, "transformers") == outer_transformers
    assert _version(Path(sys.executable), "transformers") == outer_transformers


def test_min_env_refuses_a_transformers_other_than_the_pin():
    """It cannot silently test the installed (newer) transformers: the recipe asserts the version it got."""
    proc = _make("-n", "min-env")
    assert proc.returncode == 0, proc.stderr
    assert f"assert v == '{MIN_TRANSFORMERS}'" in proc.stdout
    assert "--system-site-packages" not in proc.stdout


def _stamp_name(py):
    prefix = subprocess.run([str(py), "-c", "import sys; print(sys.prefix)"], check=True, capture_output=True,
                            text=True).stdout.strip()
    return f"installed-{hashlib.sha1(prefix.encode()).hexdigest()[:12]}"


def test_make_test_installs_only_when_something_changed(tmp_path):
    """`make test`/`make lint` install on a fresh clone (no stamp), in a new environment, and after an edit of
    pyproject.toml or the Makefile; otherwise they go straight to the checks. `make install` always installs."""
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / f, tmp_path / f)

    installs = 'pip install -e ".[test,demo]"'

    def dry(*args):
        proc = _make("-n", *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert installs in dry("lint")  # fresh clone: no stamp
    stamp = tmp_path / ".make" / _stamp_name(sys.executable)
    stamp.parent.mkdir()
    stamp.touch()
    assert installs not in dry("lint") and "ruff check" in dry("lint")
    assert installs not in dry("test")
    assert installs in dry("install")
    st = stamp.stat()
    os.utime(tmp_path / "pyproject.toml", (st.st_atime, st.st_mtime + 10))
    assert installs in dry("lint")  # pyproject.toml edited
    os.utime(stamp, (st.st_atime, st.st_mtime + 20))
    assert installs not in dry("lint")
    other = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=60)
    assert installs in dry("lint", f"PY={other / 'bin' / 'python'}")  # another environment


def test_ci_runs_the_readme_test_command_and_it_lints():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and ci.strip().splitlines()[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text()
    assert "\ntest: lint" in makefile and "ruff check" in makefile
