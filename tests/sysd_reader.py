"""Reads a file on the mount with O_DIRECT until /run/reader.stop exists; checks every byte
against the store's copy, counts errors, reports the worst stall (JSON on stdout)."""
import json
import mmap
import os
import random
import sys
import time

path, reference, tag = sys.argv[1], sys.argv[2], sys.argv[3]
ref = open(reference, "rb").read()
block = 64 << 10
buf = mmap.mmap(-1, block)
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
errors, reads, worst, worst_at, events = 0, 0, 0.0, 0.0, []
rnd = random.Random(1)
stop = f"/run/reader.{tag}.stop"
started = time.monotonic()
while not os.path.exists(stop):
    off = rnd.randrange(len(ref) // block) * block
    t = time.monotonic()
    try:
        n = os.preadv(fd, [buf], off)
        if n != block or buf[:n] != ref[off:off + n]:
            errors += 1
            events.append(f"{t - started:.3f} wrong bytes at {off} ({n})")
    except OSError as exc:
        errors += 1
        events.append(f"{t - started:.3f} {exc}")
        time.sleep(0.01)
    if reads % 50 == 0:  # a new open now and then: lookups and opens go on too
        try:
            with open(path, "rb") as f:
                f.seek(off)
                if f.read(4096) != ref[off:off + 4096]:
                    errors += 1
                    events.append(f"{t - started:.3f} wrong bytes (open) at {off}")
        except OSError as exc:
            errors += 1
            events.append(f"{t - started:.3f} open: {exc}")
    d = time.monotonic() - t
    if d > worst:
        worst, worst_at = d, t - started
    reads += 1
    time.sleep(0.002)
print(json.dumps({"reads": reads, "errors": errors, "worst_stall": round(worst, 3),
                  "worst_at": round(worst_at, 3), "events": events[:20]}))
