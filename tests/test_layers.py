"""The import graph runs one way: each package imports only from the layers below it (README,
"Layout"). Library code never reaches into a runnable job (pipeline/), and the store contract
(schemas/) depends on no model code."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
# Lowest first. A package may import its own modules and those of any earlier layer.
LAYERS = [("schemas",), ("models",), ("transforms",), ("scenes", "evaluation"), ("training",), ("pipeline",),
          ("bench", "tests")]
LEVEL = {pkg: n for n, layer in enumerate(LAYERS) for pkg in layer}


def project_imports(path: pathlib.Path):
    """(line, top-level project package) for every absolute import in the file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LEVEL:
                yield node.lineno, name.split(".")[0]


def test_every_import_runs_down_the_layers():
    upward, seen = [], set()
    for pkg, level in LEVEL.items():
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, target in project_imports(path):
                seen.add((pkg, target))
                if LEVEL[target] > level or (LEVEL[target] == level and target != pkg):
                    upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert upward == []
    # the check reads real imports: the jobs use the libraries, and the tests use the jobs
    assert {("pipeline", "evaluation"), ("pipeline", "scenes"), ("training", "models"),
            ("tests", "pipeline")} <= seen


def test_only_tests_and_benchmarks_import_the_jobs_and_only_to_run_them():
    """Outside pipeline/, a job is imported as a module (``from pipeline import rerank``, to call
    its run() or main()); nothing takes a name from inside a job file: library code lives in the
    packages below."""
    jobs = {p.stem for p in (REPO / "pipeline").glob("*.py")} - {"__init__"}
    importers, reaching_in = set(), []
    for pkg in set(LEVEL) - {"pipeline"}:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module == "pipeline":
                        importers.add(pkg)
                        reaching_in += [f"{path.name}: pipeline.{a.name}" for a in node.names if a.name not in jobs]
                    elif node.module.startswith("pipeline.") and node.module != "pipeline._cli":
                        importers.add(pkg)
                        reaching_in.append(f"{path.name}: from {node.module} import ...")
                elif isinstance(node, ast.Import) and any(a.name.startswith("pipeline") for a in node.names):
                    importers.add(pkg)
    assert importers == {"bench", "tests"}
    assert reaching_in == []
