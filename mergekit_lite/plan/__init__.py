"""From spec and headers to jobs, before any tensor data is read: the planner, the layouts that decide which
output tensors exist (whole_models, stacking, concat), parameters per tensor, the shard plan, the dry-run
description.
"""
