"""`python -m kfac_fast.demo`."""
from .cli import main

main()
