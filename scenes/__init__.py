"""Generated data as a library: the compositional scenes benchmark (vocabulary and splits, drawing,
captions, shards and queries) and the demo photo shards (photos.py).

pipeline/make_scenes.py and pipeline/make_demo_shards.py are their command lines.
"""
