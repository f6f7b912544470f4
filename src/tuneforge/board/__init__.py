"""tuneforge board: the whole workflow in a web page (local by default)."""
