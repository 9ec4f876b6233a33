"""The README's first command, as a user runs it: `raylign quickstart` aligns SmolLM2 toward positive
text with GRPO and the VADER lexicon; the held-out reward must rise clearly (~7-9 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_raises_the_held_out_vader_reward(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="")  # its own local Ray, as on a laptop
    out = subprocess.run([sys.executable, "-m", "raylign.cli", "quickstart", "progress=false"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "quickstart.json").read_text())
    print("\n" + out.stdout[-2500:])
    assert summary["reward_after"] > summary["reward_before"] + 0.1, summary
    assert summary["kl_before"] == pytest.approx(0.0, abs=1e-3) and 0 < summary["kl_after"] < 50, summary
    assert "raylign serve" in out.stdout and "held-out samples" in out.stdout
    assert (tmp_path / "runs" / "quickstart" / "final" / "config.json").exists()
