"""Mixed precision: a width per layer, chosen from measured sensitivity under a size budget.

``sensitivity`` prices every candidate width of every layer, ``allocate`` picks the widths that
cost least within the budget (``sizes``: as the pack-quantized export stores them), ``plan`` keeps
the widths (and reads and writes plan files), ``overrides`` parses ``--keep-bits``, ``agreement``
checks a signal against the perplexity each layer alone costs, and ``setup`` ties them to a run.
The engine then quantizes each layer on its own grid in one ordinary pass.
"""
