"""Command-line tools: download data, convert, serve, benchmark."""
