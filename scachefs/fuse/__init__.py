"""scachefs's own FUSE session layer: the kernel protocol on /dev/fuse, nothing about images.

:mod:`abi` has the wire structs, :mod:`mount` mounts and unmounts,
:mod:`session` reads, dispatches and answers requests, and :mod:`ops` is what a
file system implements. Why it exists (instead of pyfuse3): docs/design.md.
"""
