"""Independent check of an export bundle: only manifest.json, the ONNX files and ONNX Runtime.

Imports nothing from this project (numpy, onnxruntime and the standard library only), reads the
test images itself, runs every device in manifest order, concatenates their outputs, runs the
aggregator and prints the accuracy, to compare with report.json.

    python benchmarks/reproduce_accuracy.py runs/fmnist-quick/export \
        --idx /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
    python benchmarks/reproduce_accuracy.py BUNDLE --npy images.npy labels.npy   # uint8 [N, C, H, W], int [N]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def read_idx(path: str) -> np.ndarray:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--idx", nargs=2, metavar=("IMAGES", "LABELS"))
    source.add_argument("--npy", nargs=2, metavar=("IMAGES", "LABELS"))
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    parts = [*manifest["devices"], manifest["aggregator"]]
    for part in parts:
        for rel, sha in part["sha256"].items():
            if hashlib.sha256((args.bundle / rel).read_bytes()).hexdigest() != sha:
                print(f"{rel}: checksum mismatch", file=sys.stderr)
                return 1
    if args.idx:
        images, labels = read_idx(args.idx[0])[:, None], read_idx(args.idx[1]).astype(np.int64)
    else:
        images, labels = np.load(args.npy[0]), np.load(args.npy[1]).astype(np.int64)
    sessions = [ort.InferenceSession(str(args.bundle / p["files"]["onnx"]), providers=["CPUExecutionProvider"])
                for p in parts]
    correct = 0
    for start in range(0, len(labels), args.batch_size):
        x = images[start:start + args.batch_size].astype(np.float32) / 255.0
        vectors = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions[:-1]]
        agg = sessions[-1]
        logits = agg.run(None, {agg.get_inputs()[0].name: np.concatenate(vectors, axis=1)})[0]
        correct += int((logits.argmax(1) == labels[start:start + args.batch_size]).sum())
    print(f"accuracy {correct / len(labels):.4f} on {len(labels)} images "
          f"({len(sessions) - 1} devices + aggregator, {manifest['transport']['name']} transport)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
