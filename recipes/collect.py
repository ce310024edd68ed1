"""`tokenq collect` as a launchable script (read it in `tokenq/scripts/collect.py`, top to bottom).

    accelerate launch recipes/collect.py [ARGS ...]          # the same arguments as `tokenq collect`
"""

from tokenq.scripts.collect import main

if __name__ == "__main__":
    main()
