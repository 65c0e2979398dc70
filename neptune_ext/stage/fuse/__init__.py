"""``fuse_stages(model)``: see model.py."""
