"""What is done with a model: perplexity (eval) and text generation (generate)."""
