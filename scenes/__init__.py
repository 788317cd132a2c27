"""The compositional scenes benchmark as a library: vocabulary and splits, drawing, captions, shards.

pipeline/make_scenes.py is its command line.
"""
