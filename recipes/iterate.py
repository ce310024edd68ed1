"""`tokenq iterate` as a launchable script (read it in `tokenq/scripts/iterate.py`, top to bottom).

    accelerate launch recipes/iterate.py [ARGS ...]          # the same arguments as `tokenq iterate`
"""

from tokenq.scripts.iterate import main

if __name__ == "__main__":
    main()
