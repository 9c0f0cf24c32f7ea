"""What notebooks and scripts call: run_merge with its MergeSettings (merge), and fold_lora (fold).
``mergekit_lite`` re-exports them lazily.
"""
