"""The utilities layer: one place for each helper the commands share.

* :mod:`.files` -- atomic file writes (temporary file, fsync, rename) and stale-temporary cleanup;
* :mod:`.net` -- free loopback ports;
* :mod:`.distributed` -- process-group setup for every launcher, seeding, RNG state, collectives;
* :mod:`.labelmap` -- the ignore index (255), the VOC palette, palette-PNG encoding of label maps;
* :mod:`.limits` -- the pixel bound every reader checks before it decodes or allocates;
* :mod:`.progress` -- the rich progress bar (drawn on terminals only);
* :mod:`.log` -- rank-aware logging setup and the ``--log-level`` flag;
* :mod:`.cli` -- the wrapper every command runs through (exit 2 bad usage, 1 failed run).

Submodules are imported explicitly (``from puzzlecam.utils.files import atomic_write_json``): this
package imports nothing heavy by itself.
"""
