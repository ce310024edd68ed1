"""Built-in recipe configs, shipped inside the package as `tokenq.configs` (see pyproject.toml)."""
