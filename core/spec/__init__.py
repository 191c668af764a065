"""What a request asks for, as pydantic models only (no torch): the API validates with them before any
GPU time, and the worker trains exactly what they say. Every layer reads them; they import nothing of
core but each other."""
