"""Image models shared by embed, train and serving: model specs, backbones, heads, the artifact format, the
``Embedder`` and image preprocessing. Imports torch."""
