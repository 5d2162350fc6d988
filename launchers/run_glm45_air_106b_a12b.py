"""Launch RL training of GLM-4.5-Air (106B-A12B) on a Ray cluster:

    python launchers/run_glm45_air_106b_a12b.py --num-nodes N --hostfile FILE [--dry-run]

Every step lives in glm_rl/launch.py, the recipe tables in glm_rl/launch_recipes.py (shared with the
other model's launcher).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from glm_rl.launch import GLM45_AIR, make_app  # noqa: E402

app = make_app(GLM45_AIR)

if __name__ == "__main__":
    app()
