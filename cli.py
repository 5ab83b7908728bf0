"""The ``hatllm-edge`` command line from a checkout (``python cli.py ...``); installed, the
``hatllm-edge`` script runs the same :func:`hatllm_edge.cli.main`."""

import sys

from hatllm_edge.cli import main

if __name__ == "__main__":
    sys.exit(main())
