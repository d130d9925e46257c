"""A model's way in and out: from a MODEL string to a model, and from a model to a cbtool file.

``resolve`` turns a MODEL string (a timm or Hugging Face name, a local folder, a cbtool file) into a model and
is the only door callers need; it calls down into ``fit`` (input size, weight shapes, finite weights),
``architectures`` (offline rebuilds from a config), ``hub`` (fast Hub failures), ``provenance`` (the source
record every model carries) and ``checkpoint`` (the safetensors file format, whose metadata ``metadata``
validates). Importing this package imports none of them (and no torch).
"""
