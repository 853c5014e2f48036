"""`pgwarden ui`: the history browser (a local web app over pgwarden's Python API)."""
