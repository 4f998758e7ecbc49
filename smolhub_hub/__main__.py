"""`python -m smolhub_hub ...`: see smolhub_hub/cli.py."""
from smolhub.cli import run_main
from smolhub_hub.cli import main

if __name__ == "__main__":
    run_main(main)
