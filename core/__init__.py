"""The standard-library base every layer may use: atomic files, sha256, run locks, the machine's name."""
