"""The merge spec: mergekit's YAML read safely (safe_yaml), checked key by key (schema) with model references
(references). Knows nothing of tensors.
"""
