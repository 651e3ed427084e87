"""`bench/scale.py`, the capacity benchmark the README's figures come from, still measures what it says.

Only its correctness is checked (every answer arrives exactly, nothing refused or lost, the counters
it reports are filled in); its latency and CPU figures depend on the machine and are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scale_benchmark_reports_every_answer_exactly() -> None:
    users = 12
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), str(users), "--deltas", "5", "--spacing", "0.3",
         "--ramp", "0.5", "--poll", "0.3", "--give-up", "90", "--timeline", "--json"],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["refused"], result["lost"], result["exact"]) == (0, 0, users), result["lost_examples"]
    assert result["log_errors"] == 0
    assert result["polls"] >= users  # every user polled until its finish
    assert all(cpu > 0 for cpu in result["cpu_s"]) and result["redis_commands_per_answer"] > 0
    # the answers take at least 1.5 s of the stand-in's pauses, so the per-second sampler ran at least once
    assert result["timeline"] and all(len(second) == 4 for second in result["timeline"])
