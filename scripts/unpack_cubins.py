"""Unpacks the cubins of a bundle's cache.tar.xz (scripts/build_gpu_bundle.sh) flat into a
kernel cache folder (FDMOE_CACHE_DIR), creating it: usage unpack_cubins.py <tar.xz> <folder>."""
import os
import sys
import tarfile

archive, folder = sys.argv[1:3]
os.makedirs(folder, exist_ok=True)
with tarfile.open(archive) as t:
    for m in t:
        if m.isfile():
            with open(os.path.join(folder, os.path.basename(m.name)), "wb") as f:
                f.write(t.extractfile(m).read())
