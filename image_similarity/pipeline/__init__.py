"""The numbered steps as library code: ranker training, evaluation, a finished run's layout, figures."""
