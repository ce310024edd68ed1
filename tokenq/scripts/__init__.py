"""The recipes as importable modules: what `recipes/*.py` and the `tokenq` command run."""
