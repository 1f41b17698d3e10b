"""scachefs: a shadow cache for the backing layers of VM image stacks, as a FUSE filesystem."""

__version__ = "0.1.0"
