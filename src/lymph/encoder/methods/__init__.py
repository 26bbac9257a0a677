"""Stage-one methods, one module per method, each defining ``METHOD`` (build, loss,
features); their names and facts are in :mod:`lymph.encoder.registry`. ``morphometry``
computes measurements without a network."""
