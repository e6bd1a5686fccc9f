"""Runnable examples that use every part of scancache (they need the ``[all]`` extra).

``python -m examples.demo`` (``make demo``): sample data -> Dask job -> server -> Keras training
-> ``write_predictions`` -> a PNG preview -> how to look at it all in the viewer.
"""
