"""Signed bundles: who exported it, not only whether it is intact.

The manifest's sha256 entries prove that every file is the one the manifest lists, but anyone who
can write the bundle can recompute them. A signature proves origin: ``nonn export --sign KEY`` signs
the exact bytes of ``manifest.json`` with an Ed25519 private key (PEM, e.g. from
``openssl genpkey -algorithm ed25519 -out key.pem``) and writes the 64-byte signature to
``manifest.sig``. A process given the public key (``openssl pkey -in key.pem -pubout -out
key.pub.pem``) refuses a bundle whose manifest is unsigned or signed by another key; the manifest's
checksums then vouch for every file. Like ``bundle.format``, this module needs no torch; it imports
``cryptography`` only when a key is used.
"""
from __future__ import annotations

import os
from pathlib import Path

from bundle.format import BundleError

SIGNATURE_FILE = "manifest.sig"


def _serialization():
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as e:
        raise BundleError("signed bundles need the 'cryptography' package: pip install cryptography") from e
    return serialization


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file (unencrypted), or a one-line error naming the file."""
    key = _load_pem(path, "private", lambda data: _serialization().load_pem_private_key(data, password=None))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key; bundles are signed with Ed25519 "
                          "(openssl genpkey -algorithm ed25519 -out key.pem)")
    return key


def load_public_key(path: str | Path):
    """The Ed25519 public key in a PEM file, or a one-line error naming the file."""
    key = _load_pem(path, "public", lambda data: _serialization().load_pem_public_key(data))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key (openssl pkey -in key.pem -pubout -out key.pub.pem)")
    return key


def _load_pem(path: str | Path, kind: str, parse):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the {kind} key ({e.strerror})") from e
    try:
        return parse(data)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: not an unencrypted PEM {kind} key ({str(e).splitlines()[0]})") from e


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> Path:
    """Sign ``bundle_dir/manifest.json``; the signature is written whole (temporary file, then rename)."""
    root = Path(bundle_dir)
    signature = load_private_key(private_key_path).sign((root / "manifest.json").read_bytes())
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_bytes(signature)
    os.replace(tmp, root / SIGNATURE_FILE)
    return root / SIGNATURE_FILE


def verify_bundle(bundle_dir: str | Path, public_key_path: str | Path) -> None:
    """Raise BundleError unless ``manifest.json`` carries a valid signature by the holder of the key."""
    root = Path(bundle_dir)
    key = load_public_key(public_key_path)
    from cryptography.exceptions import InvalidSignature

    signature_path = root / SIGNATURE_FILE
    if not signature_path.is_file():
        raise BundleError(f"{root}: unsigned bundle (no {SIGNATURE_FILE}) and a public key was given; export it "
                          "with --sign KEY")
    try:
        key.verify(signature_path.read_bytes(), (root / "manifest.json").read_bytes())
    except InvalidSignature as e:
        raise BundleError(f"{root}: {SIGNATURE_FILE} does not verify with {public_key_path}: signed by another key, "
                          "or the manifest changed after signing") from e
