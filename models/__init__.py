"""The fine-tuned models shipped with hatllm-edge (package data): see README.md."""
