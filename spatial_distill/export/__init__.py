"""PyTorch artifacts of a trained student (`config.mode=export`)."""
