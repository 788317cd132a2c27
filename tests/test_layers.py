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


def test_only_jobs_tests_and_benchmarks_import_the_jobs():
    importers = {pkg for pkg in LEVEL for path in (REPO / pkg).rglob("*.py")
                 for _, target in project_imports(path) if target == "pipeline" and pkg != "pipeline"}
    assert importers == {"bench", "tests"}
