"""A first run works: ``import revtriton.kernels`` from the checkout with no install and after each
kind of install (legacy egg-link and PEP 660 editable, wheel), the GPU script's dry run with
revtriton not installed, and CI runs the README's test command.

Each install goes into a fresh virtual environment that sees this environment's packages
(torch, triton, numpy, setuptools, wheel) through a ``.pth`` line, but not its revtriton: the
``.pth`` files of an added directory are not processed, so this session's own editable install
stays invisible there.
"""
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHERE = "import revtriton, revtriton.kernels as k; print(revtriton.__file__); print(k.__file__)"


def _run(*cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def checkout(tmp_path):
    """A copy of what an install reads: setup.py, revtriton/ (with its kernels symlink), kernels/."""
    dst = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("revtriton", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), dst / name, symlinks=True, ignore=ignore)
    shutil.copy(os.path.join(ROOT, "setup.py"), dst)
    assert os.readlink(dst / "revtriton" / "kernels") == os.path.join("..", "kernels")
    return dst


@pytest.fixture(scope="module")
def venv_template(tmp_path_factory):
    """A fresh virtual environment (its own pip and setuptools) that also sees this one's packages."""
    path = tmp_path_factory.mktemp("template") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    packages = _run(python, "-c", "import site; print(site.getsitepackages()[0])", cwd=path).strip()
    with open(os.path.join(packages, "parent.pth"), "w") as f:
        f.write(site.getsitepackages()[0] + "\n")
    return path, os.path.relpath(packages, path)


@pytest.fixture
def venv(venv_template, tmp_path):
    """``(python, site-packages)`` of a copy of the template: a venv finds its prefix from where its
    interpreter lies, so the copy is a virtual environment of its own."""
    template, packages = venv_template
    path = tmp_path / "venv"
    shutil.copytree(template, path, symlinks=True)
    return str(path / "bin" / "python"), str(path / packages)


# What each kind of install needs from the environment, checked in the test's venv itself: pip
# refuses --no-use-pep517 unless setuptools and wheel both import, and a PEP 517 build (an editable
# wheel or a plain one) needs the bdist_wheel command, built into setuptools since 70.1 and given
# by the wheel package before. CI's fresh venv has both (the test extra installs wheel).
BUILD_TOOLS = """
import importlib.util
missing = [m for m in ("setuptools", "wheel") if importlib.util.find_spec(m) is None]
print("modules:" + ",".join(missing))
try:
    from setuptools.dist import Distribution
    Distribution().get_command_class("bdist_wheel")
    print("bdist_wheel:")
except Exception as e:
    print("bdist_wheel:" + (type(e).__name__ + ": " + str(e)).replace(chr(10), " "))
"""


def _skip_without_build_tools(python, cwd, legacy=False):
    """Skip, saying what is missing, where ``python``'s environment cannot build this kind of
    install: that is the environment's lack, not revtriton's fault."""
    found = dict(line.split(":", 1) for line in _run(python, "-c", BUILD_TOOLS, cwd=cwd).splitlines()
                 if line.startswith(("modules:", "bdist_wheel:")))
    if legacy and found["modules"]:
        pytest.skip(f"pip's --no-use-pep517 needs setuptools and wheel; this environment lacks "
                    f"{found['modules']} (pip install wheel, as the test extra does)")
    if not legacy and found["bdist_wheel"]:
        pytest.skip(f"building a wheel needs the bdist_wheel command (setuptools>=70.1, or the wheel "
                    f"package; the test extra installs wheel), missing here: {found['bdist_wheel']}")


def _imported_from(python, cwd):
    return [os.path.dirname(line) for line in _run(python, "-c", WHERE, cwd=cwd).split()]


def test_the_checkout_imports_with_no_install(checkout, venv):
    python, _ = venv
    assert _imported_from(python, checkout) == [str(checkout / "revtriton"), str(checkout / "revtriton" / "kernels")]


@pytest.mark.parametrize("mode,marker", [
    ("legacy", "revtriton.egg-link"),  # setup.py develop: the checkout's root on sys.path
    ("pep660", "__editable__.revtriton-0.1.0.pth"),  # setuptools' editable wheel
])
def test_editable_installs_import_the_checkout_from_anywhere(mode, marker, checkout, venv, tmp_path):
    python, packages = venv
    _skip_without_build_tools(python, tmp_path, legacy=mode == "legacy")
    flags = ["--no-use-pep517"] if mode == "legacy" else ["--use-pep517"]
    _run(python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *flags, "-e", str(checkout), cwd=tmp_path)
    assert marker in os.listdir(packages)  # the kind of install this test is about
    assert _imported_from(python, tmp_path) == [str(checkout / "revtriton"), str(checkout / "revtriton" / "kernels")]


def test_a_wheel_holds_the_kernels_once_and_the_checkout_still_shadows_it(checkout, venv, tmp_path):
    python, packages = venv
    _skip_without_build_tools(python, tmp_path)
    _run(python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"),
         str(checkout), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("revtriton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = sorted(n for n in names if n.endswith(".py") and "kernels" in n.split("/")[:-1])
    assert kernel_files == sorted(f"revtriton/kernels/{f}" for f in os.listdir(checkout / "kernels") if f.endswith(".py"))
    _run(python, "-m", "pip", "install", "--no-deps", str(wheel), cwd=tmp_path)
    installed = os.path.join(packages, "revtriton")
    assert _imported_from(python, tmp_path) == [installed, os.path.join(installed, "kernels")]
    # python -m pytest from the checkout's root runs the checkout's files, not the wheel's
    (checkout / "test_where.py").write_text(
        "import os, revtriton.kernels\n"
        "def test_where():\n"
        "    assert revtriton.kernels.__file__.startswith(os.getcwd() + os.sep), revtriton.kernels.__file__\n")
    _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_where.py", cwd=checkout)


def test_the_gpu_scripts_dry_run_passes_from_the_parent_folder_with_nothing_installed(venv, tmp_path):
    """As on the offline GPU machine: its python3 has torch, triton and numpy but not revtriton, and
    OUTDIR is relative to a folder that is not the repository's root."""
    python, _ = venv
    assert _run(python, "-c", "import importlib.util; print(importlib.util.find_spec('revtriton'))",
                cwd=tmp_path).strip() == "None"
    parent = os.path.dirname(ROOT)
    env = dict(os.environ, PATH=os.path.dirname(python) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", os.path.join(os.path.basename(ROOT), "bench", "gpu_check.sh"), "--dry-run",
                           os.path.relpath(tmp_path / "out", parent)],
                          cwd=parent, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    steps = ("import", "collect", "compile", "kernels-smoke", "graph-models", "models")
    assert [step for step in steps if f"-- {step}: exit 0" not in log] == []
    assert f"revtriton from {ROOT}" in log
    assert int(re.search(r"(\d+)/\d+ tests collected", log).group(1)) > 0  # the CUDA tests
    assert len(list((tmp_path / "out").glob("compiled-*.md"))) == 1  # sm_90, every launch
    assert len(list((tmp_path / "out").glob("kernels-cpu-*.md"))) == 1  # the kernel benchmark's code, tiny


def test_the_gpu_scripts_step_limits_leave_slack_in_the_device_tools_ten_minutes():
    with open(os.path.join(ROOT, "bench", "gpu_check.sh")) as f:
        script = f.read()
    limits = dict(re.findall(r"^step (\S+) (\d+) ", script, re.M))  # unindented: the GPU run's steps
    assert set(limits) == {"import", "preflight", "tests", "kernels", "graphs", "suite"}
    assert sum(map(int, limits.values())) <= 450  # of the 480 s the script's header allows


def _fenced_command(readme, heading):
    """The one-line command in the first ```bash block after the line starting with ``heading``."""
    after = readme[readme.index(heading):]
    return re.search(r"```bash\n(.+?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readmes_test_command_in_a_fresh_virtual_environment():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    command = _fenced_command(readme, "Run the tests")
    assert command.endswith("python -m pytest -q tests")
    assert ci.rstrip().splitlines()[-1] == command
    assert re.search(r"^python3 -m venv ", ci, re.M) and "mktemp -d" in ci and "--system-site-packages" not in ci
    main_job = _fenced_command(readme, "Run the benchmark")
    assert main_job.endswith("python -m bench") and ".[plot]" in main_job  # the plot needs matplotlib
