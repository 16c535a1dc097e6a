"""The recipe that rebuilds the default model, as a product: the pinned data sources and their
registry (``sources``, ``archive``), the data builder with its held-out guard (``build``), the
training rows (``rows``, ``conversations``), and ``mlx-safesig align``'s resumable run of every
stage (``pipeline``) with the model card it writes (``card``).

HELDOUT.md names the frozen held-out sources; ``sources.HELDOUT_SOURCES`` is the same list in code.
"""
