"""nanoft: a minimal, readable, fast LLM fine-tuning trainer in plain PyTorch."""
