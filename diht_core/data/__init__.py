"""Data: the built-in synthetic image-caption dataset and webdataset shard I/O."""
