"""launch/grpo.py with the tests' `digits` reward in the registry (a noise-writing test model earns no
task reward, so this one gives its groups a signal), for runs in a subprocess (torchrun)."""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from dsv3.rl import rewards  # noqa: E402


def digits(r, **_) -> float:
    text = r.completion or ""
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


if __name__ == "__main__":
    rewards.REWARDS["digits"] = digits
    runpy.run_path(os.path.join(ROOT, "launch", "grpo.py"), run_name="__main__")
