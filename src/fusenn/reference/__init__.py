"""Plain PyTorch versions of every fusenn op: the ground truth for tests and the CPU fallback."""
