"""What a remote worker gets: the sdist that ``--setup_file ./setup.py`` builds (Beam falls back
to ``python setup.py sdist`` when ``build`` is not installed), the wheel pip makes from it, and
the jobs' command lines. Dataflow and Flink themselves cannot be reached from here."""
import hashlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import precompute

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "models", "schemas", "training", "evaluation", "scenes")
DEFAULT_CHECKPOINT_FILES = ("models/default/config.json", "models/default/model.safetensors")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           PYTHONWARNINGS="ignore::DeprecationWarning")


def sh(args, cwd=REPO, env=ENV, timeout=120):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def repo_modules():
    return sorted(str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    egg_base = out / "egg-info"  # keep the build's egg-info out of the working tree
    egg_base.mkdir()
    sh([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base),
        "sdist", "--dist-dir", str(out)])
    archives = list(out.glob("edje-*.tar.gz"))
    assert len(archives) == 1, archives
    return archives[0]


def test_sdist_contains_every_module_and_the_default_checkpoint(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        members = {n[len(root) + 1:] for n in names if "/" in n}
        modules = repo_modules()
        assert modules and all(m.endswith(".py") for m in modules)
        missing = [m for m in modules if m not in members]
        assert not missing, f"modules missing from the sdist: {missing}"
        for pkg in PACKAGES:
            assert f"{pkg}/__init__.py" in members
        for f in ("setup.py", "constraints.txt", "MANIFEST.in", "README.md"):
            assert f in members, f
        for f in DEFAULT_CHECKPOINT_FILES:
            assert f in members, f
            assert sha256(tar.extractfile(f"{root}/{f}").read()) == sha256((REPO / f).read_bytes()), f


def test_wheel_built_from_the_sdist_imports_and_finds_the_default_checkpoint(sdist, tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "-w", str(wheels), str(sdist)])
    (wheel,) = wheels.glob("edje-*.whl")
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
        "--disable-pip-version-check", "--target", str(target), str(wheel)])
    module_names = [m[:-3].replace("/", ".").removesuffix(".__init__") for m in repo_modules()]
    probe = ("import importlib, models, models.checkpoint as c\n"
             f"for name in {module_names!r}: importlib.import_module(name)\n"
             "print(models.__file__)\nprint(c.fingerprint(None))\n")
    env = dict(ENV, PYTHONPATH=str(target))
    out = sh([sys.executable, "-c", probe], cwd=tmp_path, env=env).stdout.split()
    # imported from the installed copy, not from the repository (the venv has an editable install)
    assert Path(out[-2]).resolve().is_relative_to(target.resolve()), out
    from models.checkpoint import fingerprint
    assert out[-1] == fingerprint(None)


def precompute_flags():
    flags = [s for a in precompute.CLI.usage()._actions for s in a.option_strings if s.startswith("--")]
    # the contract's flags (DESIGN: pipeline.precompute CLI) must be among them
    for f in ("--input", "--output", "--checkpoint", "--batch_size", "--device"):
        assert f in flags
    return flags


def test_precompute_help_mentions_every_flag():
    out = sh([sys.executable, "-m", "pipeline.precompute", "--help"]).stdout
    for flag in precompute_flags():
        assert re.search(re.escape(flag) + r"\b", out), flag
    assert "--runner" in out and "--direct_running_mode" in out  # Beam flags pass through


def filesystem_flags():
    import argparse
    from pipeline._cli import add_filesystem_flags
    parser = argparse.ArgumentParser(add_help=False)
    add_filesystem_flags(parser)
    return {s for a in parser._actions for s in a.option_strings}


def test_verify_help_mentions_every_flag():
    out = sh([sys.executable, "-m", "pipeline.verify", "--help"]).stdout
    assert set(re.findall(r"--[a-z0-9_]+", out)) == {"--help", "--store", "--no_hash"} | filesystem_flags()


def test_readme_gives_the_two_commands_and_the_docs_the_runner_flags():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, re.S))
    lines = {line.strip() for line in blocks.splitlines()}
    assert "./run_local.sh" in lines and "./run_local.sh test" in lines
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))
    for flag in ("--runner=DataflowRunner", "--project", "--region", "--temp_location",
                 "--sdk_container_image", "--experiments=use_runner_v2", "--dataflow_service_options",
                 "--setup_file", "--device cuda", "--runner=FlinkRunner", "--flink_master",
                 "--environment_type", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
                 "--runner=PrismRunner"):
        assert flag in docs, flag


def test_dockerfile_matches_the_pinned_beam_and_copies_every_package():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    pinned = re.search(r"^apache-beam==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    # constraints.txt was resolved on Python 3.11; the image's Beam must be the launcher's Beam
    assert base == f"apache/beam_python3.11_sdk:{pinned}", (base, pinned)
    for pkg in PACKAGES:
        assert re.search(rf"^COPY\s.*\b{pkg}/", dockerfile, re.M), pkg
    assert "-c constraints.txt" in dockerfile
    assert not re.search(r"^ENTRYPOINT", dockerfile, re.M)  # Dataflow starts the SDK harness via the base entrypoint
