"""accelerate launcher configs, shipped as `tokenq.configs.accelerate`."""
