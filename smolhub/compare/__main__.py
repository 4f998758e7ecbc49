from smolhub.cli import run_main
from smolhub.compare import main

if __name__ == "__main__":
    run_main(main)
