"""The package's structure rules (issue 16), checked by tools/check_structure.py: files under 400 lines,
functions under 60, no import cycle between glm_rl modules, no import of another module's `_private` names.
Each failure lists every offender as path:line with its size. The checker itself is tested on a small package
made here, so a checker that finds nothing cannot pass for a clean tree."""

from __future__ import annotations

import functools
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_structure", REPO / "tools" / "check_structure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cs = _load_checker()


@functools.cache
def _glm_rl_modules():
    modules = cs.load(REPO / "glm_rl")
    assert {"glm_rl", "glm_rl.cli", "glm_rl.config"} <= set(modules)  # the checker reads the real package
    return modules


@pytest.mark.parametrize(
    "rule", [cs.long_files, cs.long_functions, cs.import_cycles, cs.private_imports], ids=lambda f: f.__name__
)
def test_glm_rl_structure(rule):
    offenders = rule(_glm_rl_modules())
    assert not offenders, f"{rule.__name__} (python tools/check_structure.py lists them all):\n" + "\n".join(offenders)


# -- the checker on a package made here -----------------------------------------------------------------------
def _function(name: str, body_lines: int, indent: str = "") -> str:
    """A def of 1 + body_lines lines."""
    return "".join([f"{indent}def {name}():\n", *(f"{indent}    x = {i}\n" for i in range(body_lines))])


@pytest.fixture
def package(tmp_path):
    files = {
        "__init__.py": "from .a import run\n",
        "a.py": "from . import b\n\n\ndef run():\n    return b.f()\n",
        "b.py": "def f():\n    from pkg.a import run  # inside a function: still an import\n    return run\n",
        # c -> d only for type checking: no cycle with d -> c; the private name still counts
        "c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.d import D, _Proto\n",
        "d.py": "import pkg.c\n\n\nclass D: ...\n\n\n_hidden = 1\n__version__ = '1'\n",
        "e.py": "import os\nfrom .d import _hidden, __version__, D\n",
        "sub/__init__.py": "",
        "sub/deep.py": "from ..b import f\nfrom .. import e\n",
        "long.py": _function("ok", 59)
        + _function("too_long", 60)
        + "class K:\n"
        + _function("method", 60, indent="    ")
        + "def outer():\n"
        + _function("inner", 61, indent="    "),
        "big.py": "x = 1\n" * 401,
    }
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_checker_import_graph(package):
    graph = {m: set(deps) for m, deps in cs.import_edges(cs.load(package)).items()}
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},  # `from . import b`: the submodule, not the package
        "pkg.b": {"pkg.a"},
        "pkg.c": set(),  # TYPE_CHECKING only
        "pkg.d": {"pkg.c"},
        "pkg.e": {"pkg.d"},
        "pkg.sub": set(),
        "pkg.sub.deep": {"pkg.b", "pkg.e"},
        "pkg.long": set(),
        "pkg.big": set(),
    }


def test_checker_finds_every_offender(package):
    found = cs.check(package)
    assert found[f"files over {cs.MAX_FILE_LINES} lines"] == ["pkg/big.py:1: 401 lines (max 400)"]
    assert sorted(found[f"functions over {cs.MAX_FUNCTION_LINES} lines"]) == [
        "pkg/long.py:123: K.method is 61 lines (max 60)",
        "pkg/long.py:184: outer is 63 lines (max 60)",
        "pkg/long.py:185: outer.inner is 62 lines (max 60)",
        "pkg/long.py:61: too_long is 61 lines (max 60)",
    ]
    assert found["import cycles"] == [
        "import cycle among 2 modules: pkg.a, pkg.b",
        "  pkg/a.py:1: pkg.a imports pkg.b",
        "  pkg/b.py:2: pkg.b imports pkg.a",
    ]
    assert sorted(found["imports of private names from other modules"]) == [
        "pkg/c.py:4: imports private name _Proto from pkg.d",
        "pkg/e.py:2: imports private name _hidden from pkg.d",
    ]


def test_checker_command_line(package, tmp_path, capsys):
    assert cs.main([str(package)]) == 1
    out = capsys.readouterr().out
    assert "pkg/big.py:1: 401 lines" in out and "import cycle among 2 modules" in out
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "__init__.py").write_text(
        textwrap.dedent("""\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from clean.m import M
        """)
    )
    (clean / "m.py").write_text("import clean\n\n\nclass M: ...\n")
    assert cs.main([str(clean)]) == 0
    assert "structure OK" in capsys.readouterr().out
