"""Resolution: from names in probe specs to files, inodes and file offsets."""
