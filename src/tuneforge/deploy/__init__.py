"""From a tuned model to production: export (GGUF, Ollama, quantized), combine, serve."""
