"""`merge ...` that pauses in the middle of writing tensors, for tests that act on a run in progress.

Usage: python tests/paused_merge.py PAUSE_DIR run SPEC -o OUT ...  When the second piece is about to be merged it
creates PAUSE_DIR/paused and waits (interruptibly) until PAUSE_DIR/go exists. Only tests use this.
"""

import os
import sys
import time

from mergekit_lite import engine
from mergekit_lite.cli import main

pause_dir = sys.argv.pop(1)
merged = 0
original = engine._compute


def paused(*args, **kwargs):
    global merged
    merged += 1
    if merged == 2:
        open(os.path.join(pause_dir, "paused"), "w").close()
        while not os.path.exists(os.path.join(pause_dir, "go")):
            time.sleep(0.02)
    return original(*args, **kwargs)


engine._compute = paused
main()
