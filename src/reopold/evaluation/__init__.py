"""Evaluation and reports: held-out accuracy and reverse KL, pass@k / maj@k, test-time scaling, ``reopold eval`` /
``reopold scaling``, and a run's report.md."""
