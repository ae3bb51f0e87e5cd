"""mlplab: a PyTorch Lightning + Hydra kit for studying how small networks learn."""
