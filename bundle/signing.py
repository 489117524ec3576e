"""Signed bundles: who exported it, not only whether it is intact.

The manifest's sha256 entries prove that every file is the one the manifest lists, but anyone who
can write the bundle can recompute them. A signature proves origin: ``nonn export --sign KEY`` signs
the exact bytes of ``manifest.json`` with an Ed25519 private key (PEM, e.g. from
``openssl genpkey -algorithm ed25519 -out key.pem``) and writes the 64-byte signature to
``manifest.sig``. A process given the public key (``openssl pkey -in key.pem -pubout -out
key.pub.pem``) refuses a bundle whose manifest is unsigned or signed by another key
(``bundle.format.verify_signature``, which a device runs without this module); the manifest's
checksums then vouch for every file.
"""
from __future__ import annotations

import os
from pathlib import Path

from bundle.format import SIGNATURE_FILE, load_ed25519_key


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file (unencrypted), or a one-line error naming the file."""
    return load_ed25519_key(path, private=True)


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> Path:
    """Sign ``bundle_dir/manifest.json``; the signature is written whole (temporary file, then rename)."""
    root = Path(bundle_dir)
    signature = load_private_key(private_key_path).sign((root / "manifest.json").read_bytes())
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_bytes(signature)
    os.replace(tmp, root / SIGNATURE_FILE)
    return root / SIGNATURE_FILE
