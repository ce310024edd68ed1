"""ILQL / IQL on a token-level MDP (expectile V, TD twin Q, CQL, AWAC), then Q-guided decoding.

    accelerate launch recipes/iql_lm.py [--config FILE_OR_NAME] [--field value ...]

The recipe is `tokenq.scripts.iql` (read it there, top to bottom); after `pip install tokenq` the same
runs as `tokenq iql`, or `accelerate launch -m tokenq iql` on several processes.
"""

from tokenq.scripts.iql import main

if __name__ == "__main__":
    main()
