"""Sampling any model: its step grids (:mod:`.grids`), the one ``generate`` (text or labels, optional
init image + strength, optional mask; :mod:`.generate`) and the replacement loop of inpainting and
zero-shot editing (:mod:`.constrained`)."""
