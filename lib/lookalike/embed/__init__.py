"""The embed stage: catalog rows -> image bytes -> pictures -> embeddings, with the models that make them."""
