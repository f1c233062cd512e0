"""Search by image: the catalog items that look like a photo that is not in the catalog."""
