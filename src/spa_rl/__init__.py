"""spa-rl: train small LLM agents on text games with the SPA recipe.

Importing the package registers the games with gymnasium (`gymnasium.make("spa_rl/Sokoban-v0")`);
it does not import torch.
"""

__version__ = "0.1.0"

from spa_rl import envs as envs  # noqa: E402  (registers the gymnasium ids)
