"""Sweep Q-guided decoding strategies on a tokenq checkpoint (reward against KL and compute).

    python recipes/sweep.py CHECKPOINT [--config FILE_OR_NAME] [--field value ...]

The recipe is `tokenq.scripts.evaluate` (read it there, top to bottom); after `pip install tokenq` the same
runs as `tokenq sweep CHECKPOINT ...`.
"""

from tokenq.scripts.evaluate import sweep_main as main

if __name__ == "__main__":
    main()
