"""minflux: FLUX.1 written from scratch in plain PyTorch, loading the official weights unchanged."""
