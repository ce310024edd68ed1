"""`tokenq extract` as a launchable script (read it in `tokenq/scripts/extract.py`, top to bottom).

    accelerate launch recipes/extract.py [ARGS ...]          # the same arguments as `tokenq extract`
"""

from tokenq.scripts.extract import main

if __name__ == "__main__":
    main()
