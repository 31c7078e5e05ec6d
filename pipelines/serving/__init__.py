"""The serving path: the served model (completion.py and the code that travels with it,
served_code.py), its smoke test, and the endpoint that follows @champion."""
