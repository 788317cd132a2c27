"""The docs stay true: every flag table of docs/jobs.md against the job's --help, both ways; every
relative link of README.md and docs/ lands on a file and heading that exist; the README's
"Running on your own shards" commands run as written on the demo shards."""
import contextlib
import importlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import demo_members

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
# job -> the function that prints its --help (and exits, or returns)
JOBS = {"precompute": "run", "verify": "main", "retrieve": "run", "rerank": "run", "evaluate": "run",
        "train": "parse_args", "make_scenes": "main", "make_demo_shards": "main"}
FS_SECTION = "Object-store flags (every job but make_demo_shards)"


def help_flags(job: str, capsys) -> set:
    """The long flags --help lists under its options and groups (not those its description names)."""
    with contextlib.suppress(SystemExit):
        getattr(importlib.import_module(f"pipeline.{job}"), JOBS[job])(["--help"])
    text = capsys.readouterr().out
    listing = text[text.index("\noptions:\n"):]
    flags = set()
    for line in listing.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)(?:, (--no-[\w-]+))?", line)
        if m:
            flags.update(f for f in m.groups() if f and not f.startswith("--no-"))
    return flags - {"--help"}


def sections(path: Path) -> dict:
    """'## heading' -> its text, for one Markdown file."""
    out, name = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def table_flags(text: str) -> set:
    return set(re.findall(r"^\| `(--[\w-]+)", text, re.M))


def test_every_flag_table_matches_its_jobs_help(capsys):
    docs = sections(REPO / "docs" / "jobs.md")
    fs = table_flags(docs[FS_SECTION])
    assert {"--s3_endpoint_url", "--project"} <= fs
    for job in JOBS:
        documented = table_flags(docs[f"`pipeline.{job}`"])
        helped = help_flags(job, capsys)
        if job != "make_demo_shards":
            assert fs <= helped, job
            helped -= fs
        assert documented - helped == set(), f"{job}: documented but not in --help"
        assert helped - documented == set(), f"{job}: in --help but not documented"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_lands():
    for page in [REPO / "README.md", REPO / "BENCHMARKS.md", *DOCS]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: {target}"
            if frag and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)
                assert frag in {anchor(h) for h in headings}, f"{page.name}: {target}"


def readme_commands() -> list:
    text = sections(REPO / "README.md")["Running on your own shards"]
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.mark.slow
def test_the_readmes_commands_run_as_written(demo_dir, demo_store, tmp_path, capsys):
    """On the demo shards (the store copied from the suite's, so precompute resumes: every shard is
    already committed), with the placeholders replaced and nothing else changed."""
    queries, relevant = tmp_path / "queries.jsonl", {}
    for s in range(3):
        for name, data in demo_members(s, 8):
            if name.endswith(".txt"):
                relevant.setdefault(data.decode(), []).append(name[:-4])
    queries.write_text("".join(json.dumps({"query_id": f"q{n}", "text": text, "relevant": keys}) + "\n"
                               for n, (text, keys) in enumerate(sorted(relevant.items()))))
    store = tmp_path / "STORE"
    shutil.copytree(demo_store[0], store)
    subst = {"'shards/{00000..00099}.tar'": f"{demo_dir}/{{00000..00002}}.tar", "shards/{00000..00099}.tar":
             f"{demo_dir}/{{00000..00002}}.tar", "STORE": str(store), "queries.jsonl": str(queries)}
    commands = readme_commands()
    assert [c[:3] for c in commands] == [["python", "-m", f"pipeline.{job}"] for job in
                                         ("precompute", "verify", "retrieve", "rerank", "evaluate")]
    for cmd in commands:
        args = [subst.get(a, a if a.startswith("--") or "/" not in a and "." not in a else str(tmp_path / a))
                for a in cmd[3:]]
        try:
            code = importlib.import_module(cmd[2]).main(args)
        except SystemExit as e:
            code = e.code
        assert code in (None, 0), (cmd, capsys.readouterr().err[-2000:])  # verify: 0 is a clean store
    assert json.loads((tmp_path / "report" / "report.json").read_text())["counts"]["queries"] == len(relevant)
