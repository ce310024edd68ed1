"""Sweep Q-guided decoding strategies on a tokenq checkpoint (reward against KL and compute).

    python recipes/generate.py [--config FILE_OR_NAME] [--field value ...]

The recipe is `tokenq.scripts.sweep` (read it there, top to bottom); after `pip install tokenq` the same
runs as `tokenq sweep`, or `accelerate launch -m tokenq sweep` on several processes.
"""

from tokenq.scripts.sweep import main

if __name__ == "__main__":
    main()
