"""Models and tokenizers from a hub id, a local directory or a packaged builtin."""
