"""Chat templates, one Jinja file per prompt-format family (see README.md here)."""
