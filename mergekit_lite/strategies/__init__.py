"""Built-in merge strategies, one small module each. The registry lists them explicitly."""
