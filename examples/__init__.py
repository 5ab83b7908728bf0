"""Example requests (package data): ``hatllm-edge rank examples/user.json``."""
