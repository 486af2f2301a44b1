"""The project's two commands, set-up included: `python3 dev.py bench` and `python3 dev.py test`.

Why: on a fresh machine with only Python and pip, a new user (and CI) gets the pinned, tested versions in a
virtual environment made here, fusenn installed into it (the C++ extension built where it can be, and said
loudly where it cannot), and then the main job or the tests, with nothing else to type.

    python3 dev.py bench [ARGS]   # python -m benchmarks ARGS in the environment
    python3 dev.py test [ARGS]    # python -m pytest -q ARGS in the environment
    python3 dev.py setup          # only make the environment
    python3 dev.py info           # python -m fusenn.info in the environment

Environment variables: FUSENN_VENV (default .venv), FUSENN_TORCH and FUSENN_TRITON (the versions, default
the newest tested pair), FUSENN_TORCH_INDEX (an index URL for torch, e.g. PyTorch's CPU wheel index, to avoid
the 5 GB CUDA build on a CPU machine). The environment is remade when the versions change and fusenn is
reinstalled when setup.py, pyproject.toml or csrc/ change.
"""

import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH = "2.14.1"    # what a bare `pip install torch` gives today; the README lists every tested pair
TRITON = "3.8.0"
TOOLS = ["numpy", "pybind11", "ninja", "setuptools", "wheel"]


def run(cmd, **kwargs):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_inputs_hash():
    h = hashlib.sha256()
    csrc = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")))
    files = ["setup.py", "pyproject.toml", os.path.join("src", "fusenn", "_cxx.py")] + csrc
    for rel in files:
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


def built_for():
    """The torch version the tree's fusenn._C (or its failed build) was made with."""
    try:
        with open(os.path.join(ROOT, "src", "fusenn", "_build.json")) as f:
            return json.load(f).get("torch", "").split("+")[0]
    except (OSError, ValueError, AttributeError):
        return None


def setup():
    """Make (or reuse) the environment; returns its python."""
    venv = os.path.join(ROOT, os.environ.get("FUSENN_VENV", ".venv"))
    python = os.path.join(venv, "bin", "python")
    torch_v = os.environ.get("FUSENN_TORCH", TORCH)
    triton_v = os.environ.get("FUSENN_TRITON", TRITON)
    index = os.environ.get("FUSENN_TORCH_INDEX", "")
    stamp_path = os.path.join(venv, "fusenn-stamp.json")
    want = {"torch": torch_v, "triton": triton_v, "index": index}
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        stamp = {}
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if {k: stamp.get(k) for k in want} != want or not os.path.exists(python):
        if sys.version_info < (3, 10):
            sys.exit(f"fusenn needs Python 3.10 or newer, this is {sys.version.split()[0]}")
        run([sys.executable, "-m", "venv", "--clear", venv])
        run(pip + ["--upgrade", "pip"])
        run(pip + [f"torch=={torch_v}"] + (["--index-url", index] if index else []))
        run(pip + [f"triton=={triton_v}"] + TOOLS)
        stamp = dict(want)
    digest = build_inputs_hash()
    if stamp.get("build") != digest or built_for() != torch_v.split("+")[0]:
        # the extension is built in place (src/fusenn), shared by every environment made from this tree
        # --no-build-isolation: the extension is built against the torch just installed
        run(pip + ["--no-build-isolation", "-e", ".[test]"], cwd=ROOT)
        stamp["build"] = digest
        with open(stamp_path, "w") as f:
            json.dump(stamp, f)
        run([python, "-m", "fusenn.info"], cwd=ROOT)
    return python


def main(argv):
    if not argv or argv[0] not in ("bench", "test", "setup", "info"):
        print(__doc__)
        return 2
    python = setup()
    command, args = argv[0], argv[1:]
    if command == "setup":
        return 0
    module = {"bench": ["-m", "benchmarks"], "test": ["-m", "pytest", "-q"], "info": ["-m", "fusenn.info"]}[command]
    return subprocess.call([python] + module + args, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
