"""The `glm-rl` console script end to end (real subprocesses)."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "glm_rl.cli", *args], capture_output=True, text=True)


def test_eval_reports_accuracy():
    out = run("eval", "--json", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 200 and result["accuracy"] >= 0.7  # greedy: the model knows the sums


def test_eval_rejects_checkpoint_that_contradicts_preset():
    out = run("eval", "--preset", "glm45-air-106b-a12b")
    assert out.returncode == 2
    assert "hidden_size: preset 4096 vs checkpoint 96" in out.stdout.replace("\n", "")


def test_unknown_preset_and_reward():
    out = run("eval", "--preset", "glm45-7b")
    assert out.returncode == 2 and "unknown model preset 'glm45-7b'" in out.stdout
    out = run("eval", "--rm-type", "nope")
    assert out.returncode == 2 and "unknown reward 'nope'" in out.stdout
