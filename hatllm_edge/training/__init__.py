"""The torch side: the HatLLM model, fine-tuning, checkpoints, the PyTorch backend, SASRec, attention analysis."""
