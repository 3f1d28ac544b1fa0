"""Code sync: which files go (ignore rules), what changed (manifest), how they travel (tar stream)."""
