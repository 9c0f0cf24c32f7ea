"""Write the small local models and LoRA adapters that the example specs in merge_configs/ use.

Usage: python scripts/make_demo_models.py [ROOT]   (default: demo/models, relative to the current folder)
Models go to ROOT/<name>, adapters to ROOT/../adapters/<name> (demo/adapters/...).
"""

import os
import sys

from mergekit_lite.testing.adapters import write_demo_adapters
from mergekit_lite.testing.synthetic import DEMO_SHAPE, parameter_count, write_demo_models

if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "demo/models"
    folders = write_demo_models(root)
    print(f"wrote {len(folders)} models of {parameter_count(DEMO_SHAPE) / 1e6:.1f}M parameters each "
          f"(bfloat16, several shards) to {root}/: {', '.join(folders)}")
    adapters_root = os.path.join(os.path.dirname(os.path.normpath(root)) or ".", "adapters")
    adapters = write_demo_adapters(adapters_root, base_model=os.path.join(root, "base"))
    print(f"wrote {len(adapters)} LoRA adapters of the base to {adapters_root}/: {', '.join(adapters)}")
