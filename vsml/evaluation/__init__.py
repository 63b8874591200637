"""Evaluation: the meta-test protocol driver, Badger analyses during meta-test, plots."""
