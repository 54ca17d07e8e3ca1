"""Measured quality: the synthetic shapes dataset, its scorer, training of the embedded model, nirvana-quality."""
