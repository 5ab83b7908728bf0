"""``python -m hatllm_edge``: the same command line as ``hatllm-edge``."""

from hatllm_edge.cli import main

main()
