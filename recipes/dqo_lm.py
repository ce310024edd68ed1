"""DQO: the LM is the Q-function; then sample from it.

    accelerate launch recipes/dqo_lm.py [--config FILE_OR_NAME] [--field value ...]

The recipe is `tokenq.scripts.dqo` (read it there, top to bottom); after `pip install tokenq` the same
runs as `tokenq dqo`, or `accelerate launch -m tokenq dqo` on several processes.
"""

from tokenq.scripts.dqo import main

if __name__ == "__main__":
    main()
