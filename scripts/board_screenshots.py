"""Write the board's screenshots to docs/board/*.png: runs the browser tests of tests/test_board.py (headless
Chromium against a real `tuneforge board`, a tiny random model trained for real) with TUNEFORGE_BOARD_SCREENSHOTS set.

    .venv/bin/python scripts/board_screenshots.py            # docs/board/
    .venv/bin/python scripts/board_screenshots.py OUT_DIR
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSER_TESTS = "typo or recommend or launch_watch or runs_list"  # the tests that visit each screen


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "board"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNEFORGE_BOARD_SCREENSHOTS": str(out.resolve())}
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_board.py",
                            "-k", BROWSER_TESTS], cwd=ROOT, env=env)
    shots = sorted(p.name for p in out.glob("*.png"))
    print(f"{len(shots)} screenshot(s) in {out}: {', '.join(shots)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
