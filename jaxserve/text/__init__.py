"""Text: tokenizers (HF directories, rebuilt from GGUF metadata), streaming detokenisation and
stop strings. Nothing here imports the weights loaders."""
