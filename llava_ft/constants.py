"""Markers shared by data, model and export: the image marker in text and the placeholder ids it becomes."""

IMAGE_TOKEN = "<image>"
# Placeholder id for one image-feature position inside input_ids (as LLaVA). It never reaches an
# embedding lookup: the model scatters projected image features into these positions.
IMAGE_TOKEN_INDEX = -200
# Label of a position that is not trained (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
