"""Layer rules from docs/DESIGN.md: the games, the text protocol and the token path never import
torch or transformers, so they stay usable (and fast to import) without a model."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["spa_rl", "spa_rl.envs", "spa_rl.agent", "spa_rl.tokens", "spa_rl.config",
                                    "spa_rl.cli"])
def test_module_does_not_import_torch(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"{module} imports {res.stdout.strip()}"


def test_envs_do_not_import_the_protocol():
    code = "import sys, spa_rl.envs; sys.exit(1 if 'spa_rl.agent' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
