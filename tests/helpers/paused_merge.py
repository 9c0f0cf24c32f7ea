"""`merge ...` that pauses in the middle of writing tensors, for tests that act on a run in progress.

Usage: python tests/helpers/paused_merge.py PAUSE_DIR run SPEC -o OUT ...  When the second merged piece is handed to
the writer (on the main thread, with the first shard file open) it creates PAUSE_DIR/paused and waits
(interruptibly) until PAUSE_DIR/go exists. Only tests use this.
"""

import os
import sys
import time

from mergekit_lite.cli import main
from mergekit_lite.engine.pipeline import WriteBehind

pause_dir = sys.argv.pop(1)
handed = 0
original = WriteBehind.put


def paused(*args, **kwargs):
    global handed
    handed += 1
    if handed == 2:
        open(os.path.join(pause_dir, "paused"), "w").close()
        while not os.path.exists(os.path.join(pause_dir, "go")):
            time.sleep(0.02)
    return original(*args, **kwargs)


WriteBehind.put = paused
main()
