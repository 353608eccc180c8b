"""The judge and the attacker stay independent: no attack, search space, prior or preset
may use the independent face recogniser's networks (dlib's detector, landmark predictor
or recogniser). A reconstruction tuned against its own judge would measure itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "mlinvert"
#: The attacker's side: everything an attack, its search space, prior or gradient
#: estimator is built from.
ATTACK_SIDE = ("attacks", "oracle", "defenses", "targets", "data")
#: Modules that reach the judge's networks.
JUDGE_MODULES = ("dlib", "face_recognition_models", "mlinvert.evaluation")
#: Where the audit turns its presets (``attacks/presets.py``, on the attack side above)
#: into one person's attack: these may not name the judge either.
AUDIT_ATTACKER = ("_build_attack", "_attack_group")
JUDGE_NAMES = {
    "dlib",
    "face_recognition_models",
    "recogniser",
    "FaceRecogniser",
    "IndependentJudge",
    "shared_recogniser",
    "judge",
}


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _attack_side_files() -> list[Path]:
    return sorted(p for room in ATTACK_SIDE for p in (SRC / room).rglob("*.py"))


def test_the_attack_side_never_imports_the_judge() -> None:
    files = _attack_side_files()
    assert len(files) > 20  # the rooms are where the test thinks they are
    offending = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in _imports(ast.parse(path.read_text()))
        if any(name == m or name.startswith(m + ".") for m in JUDGE_MODULES)
    ]
    assert not offending, offending


def test_the_audit_presets_never_touch_the_judge() -> None:
    assert (SRC / "attacks" / "presets.py") in _attack_side_files()
    tree = ast.parse((SRC / "audit" / "matrix.py").read_text())
    found = {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in AUDIT_ATTACKER
    }
    assert set(found) == set(AUDIT_ATTACKER)
    offending = []
    for name, fn in found.items():
        for node in ast.walk(fn):
            word = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
            if word in JUDGE_NAMES:
                offending.append(f"{name} uses {word}")
        offending += [f"{name} imports {m}" for m in _imports(fn) if "recogniser" in m]
    assert not offending, offending


@pytest.mark.parametrize("extra", ["", "import mlinvert.cli.attack"])
def test_loading_every_attack_module_loads_no_judge_network(extra: str) -> None:
    """dlib is loaded only when the judge is built, never by the attack side."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import mlinvert.attacks as a\n"
        "for m in pkgutil.walk_packages(a.__path__, 'mlinvert.attacks.'):\n"
        "    importlib.import_module(m.name)\n"
        f"{extra}\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in "
        "('dlib', '_dlib_pybind11', 'face_recognition_models')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
