"""Reproduce the study on a cohort manifest: features -> selection -> classifiers -> statistics -> report."""
