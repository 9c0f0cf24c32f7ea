"""Reading inputs: a model folder's tensor table and lazy tensor reads, from safetensors (checkpoint) or,
when allowed, weights-only pickles (pickled); opener picks between them.
"""
