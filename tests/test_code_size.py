"""One concern per file, no long parameter lists (issue 19): measured from the source with an AST walk, nothing
imported. No .py file over MAX_FILE_LINES lines; no function or method over MAX_FUNCTION_LINES lines (``def`` line
to last line) or over MAX_PARAMS parameters (``*args`` and ``**kwargs`` count one each; ``self``/``cls`` do not).
Exempt from the function limits: constructors (``__init__``; a dataclass's is generated) and the CLI entry points
whose signature is the command line (a finetune recipe's ``setup``, a script's ``main``)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("dropbp", "lit_gpt", "finetune", "eval", "scripts", "examples")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_PARAMS = 10
CLI_ENTRY_POINTS = {"finetune": "setup", "scripts": "main"}  # top-level function of a file in that folder


def source_files() -> list:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def parameter_count(args: ast.arguments) -> int:
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def functions(tree: ast.Module):
    """(qualified name, node, is a top-level function) of every function and method, nested ones included."""
    def walk(node, prefix: str, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child, top
                yield from walk(child, f"{prefix}{child.name}.", False)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.", False)
            else:
                yield from walk(child, prefix, top)

    yield from walk(tree, "", True)


def exempt(path: Path, name: str, top: bool) -> bool:
    if name.rsplit(".", 1)[-1] == "__init__":
        return True
    folder = path.relative_to(ROOT).parts[0]
    return top and CLI_ENTRY_POINTS.get(folder) == name


def offenders() -> list:
    found = []
    for path in source_files():
        rel = path.relative_to(ROOT)
        text = path.read_text()
        n_lines = len(text.splitlines())
        if n_lines > MAX_FILE_LINES:
            found.append(f"{rel}: {n_lines} lines (at most {MAX_FILE_LINES})")
        for name, node, top in functions(ast.parse(text, filename=str(rel))):
            if exempt(path, name, top):
                continue
            lines = node.end_lineno - node.lineno + 1
            params = parameter_count(node.args)
            if lines > MAX_FUNCTION_LINES or params > MAX_PARAMS:
                found.append(f"{rel}:{name}: {lines} lines, {params} params"
                             f" (at most {MAX_FUNCTION_LINES} lines, {MAX_PARAMS} params)")
    return found


def test_the_measure_counts_what_it_should():
    tree = ast.parse("class A:\n    def f(self, a, /, b, *c, d, **e):\n        def g(x):\n            pass\n"
                     "def main(a):\n    return a\n")
    found = {name: (parameter_count(node.args), top) for name, node, top in functions(tree)}
    assert found == {"A.f": (5, False), "A.f.g": (1, False), "main": (1, True)}
    assert exempt(ROOT / "scripts" / "x.py", "main", True) and not exempt(ROOT / "scripts" / "x.py", "main", False)
    assert not exempt(ROOT / "lit_gpt" / "x.py", "main", True) and exempt(ROOT / "eval" / "x.py", "A.__init__", False)
    assert len(source_files()) > 20


def test_no_long_files_functions_or_parameter_lists():
    found = offenders()
    assert not found, "over the size rule (issue 19):\n" + "\n".join(found)
