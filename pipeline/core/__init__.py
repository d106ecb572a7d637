"""The foundation every stage imports: config and presets, storage, tracking, progress, cluster.

Imports nothing else of ours, so tokenization, train and eval depend on it and never on the driver.
"""
