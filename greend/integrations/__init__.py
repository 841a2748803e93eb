"""greend inside training loops: callbacks for Hugging Face `transformers` (`.transformers`) and
PyTorch Lightning (`.lightning`). Import the one you use; `import greend` imports neither."""
