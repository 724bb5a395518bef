"""Hostile engine files for the bundle tests: a shared library that writes a file when it
is loaded, and AOTInductor packages carrying it."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

SENTINEL_ENV = "PDCOMPILE_TEST_SENTINEL"

# The constructor runs when the library is dlopen'ed, before any symbol is looked up:
# the moment an AOTInductor package loader opens the package.
_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void on_load(void) {
    const char *path = getenv("%s");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("native code from the bundle ran\n", f); fclose(f); }
}
""" % SENTINEL_ENV


def library(folder: Path) -> Path:
    """``folder/hostile.so``, built with the system C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the hostile shared library")
    src, out = folder / "hostile.c", folder / "hostile.so"
    src.write_text(_SOURCE)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def package(path: Path, phase: str, so: Path) -> None:
    """A minimal AOTInductor package ``path`` whose model library is ``so``."""
    model = f"{phase}/data/aotinductor/model/hostile"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{phase}/archive_format", "pt2")
        z.writestr(f"{phase}/archive_version", "0")
        z.writestr(f"{phase}/byteorder", "little")
        z.writestr(f"{phase}/.data/version", "6\n")
        z.writestr(f"{model}.wrapper_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
        z.write(so, f"{model}.wrapper.so")


def swap_library(path: Path, so: Path) -> None:
    """Replace the model library inside the real AOTInductor package ``path`` by ``so``."""
    tmp = path.with_suffix(".swapping")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        libs = [n for n in src.namelist() if n.endswith(".so")]
        assert libs, f"{path} holds no shared library"
        for info in src.infolist():
            if info.filename in libs:
                dst.write(so, info.filename)
            else:
                dst.writestr(info, src.read(info.filename))
    tmp.replace(path)


def rehash(bundle: Path, manifest: dict, rel: str) -> None:
    """List ``rel`` in the manifest with its current size and sha256."""
    import hashlib

    data = (bundle / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def reseal(bundle: Path, manifest) -> None:
    """Write ``manifest`` and its digest as export does: what anyone who can write the folder
    can do, so only the schema, the paths, consent and signatures stand against it."""
    from pdcompile.manifest import digest

    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (bundle / "manifest.sha256").write_text(json.dumps(digest(manifest)))
