"""Builders of test and benchmark data (synthetic collections, index fixtures) and run-directory comparison.
Not used by any stage."""
