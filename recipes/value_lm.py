"""Monte-Carlo value regression / Q-probes, then value-guided search.

    accelerate launch recipes/value_lm.py [--config FILE_OR_NAME] [--field value ...]

The recipe is `tokenq.scripts.value` (read it there, top to bottom); after `pip install tokenq` the same
runs as `tokenq value`, or `accelerate launch -m tokenq value` on several processes.
"""

from tokenq.scripts.value import main

if __name__ == "__main__":
    main()
