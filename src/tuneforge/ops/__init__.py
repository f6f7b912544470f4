"""Operations on finished runs: merge (and later combine, export, serve)."""
