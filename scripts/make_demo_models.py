"""Write the small local models that the example specs in merge_configs/ use (demo/models/<name>).

Usage: python scripts/make_demo_models.py [ROOT]   (default: demo/models, relative to the current folder)
"""

import sys

from mergekit_lite.synthetic import DEMO_SHAPE, parameter_count, write_demo_models

if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "demo/models"
    folders = write_demo_models(root)
    print(f"wrote {len(folders)} models of {parameter_count(DEMO_SHAPE) / 1e6:.1f}M parameters each "
          f"(bfloat16, several shards) to {root}/: {', '.join(folders)}")
