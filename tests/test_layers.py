"""Layer rules from docs/DESIGN.md: the games, the text protocol and the token path never import
torch or transformers, so they stay usable (and fast to import) without a model."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["spa_rl", "spa_rl.envs", "spa_rl.agent", "spa_rl.tokens", "spa_rl.config",
                                    "spa_rl.sections", "spa_rl.artifacts",
                                    "spa_rl.cli"])
def test_module_does_not_import_torch(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"{module} imports {res.stdout.strip()}"


def test_envs_do_not_import_the_protocol():
    code = "import sys, spa_rl.envs; sys.exit(1 if 'spa_rl.agent' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


STAGE_RECIPES = ("eval", "generate", "sft", "train")


def _imported_modules(path):
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_stage_recipe_imports_another():
    """Stages share plumbing through the layers below them (rollout/, artifacts, sections);
    only the composing recipes (pipeline, demo, report) may import stages."""
    from pathlib import Path

    import spa_rl.recipes

    folder = Path(spa_rl.recipes.__file__).parent
    for stage in STAGE_RECIPES:
        imported = _imported_modules(folder / f"{stage}.py")
        others = {f"spa_rl.recipes.{s}" for s in STAGE_RECIPES if s != stage}
        assert not imported & others, f"recipes/{stage}.py imports {sorted(imported & others)}"


def test_nothing_below_the_recipes_imports_them():
    from pathlib import Path

    import spa_rl

    root = Path(spa_rl.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("recipes",) or rel.name == "cli.py":
            continue
        bad = {m for m in _imported_modules(path) if m.startswith("spa_rl.recipes")}
        assert not bad, f"{rel} imports {sorted(bad)}"
