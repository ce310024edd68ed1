"""`python -m tokenq` and `accelerate launch -m tokenq ...`: the `tokenq` command (tokenq.cli)."""

from tokenq.cli import main

main()
