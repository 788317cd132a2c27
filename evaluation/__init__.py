"""Evaluation as a library: reading candidates and scores, recall@k, report files, image strips.

pipeline/evaluate.py is its command line; training and bench call these modules directly.
"""
