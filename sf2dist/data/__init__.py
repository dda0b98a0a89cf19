"""Data layer: the shard format, converters into it, the training loader, synthetic identities.

- `shards`: webdataset shards + per-shard index + manifest.json, and the output-dir policy;
- `recordio`: reading InsightFace .rec/.idx files without mxnet;
- `convert`: `sf2dist-convert rec|folder`, sources -> shards with rejects and reconciled counts;
- `loader`: `make_loader`, one rank's batches with an exact, seeded, resumable split;
- `synth`: `sf2dist-synth`, procedural face-like identities and a held-out verification set.
"""
from sf2dist.data.loader import ShardLoader, make_loader
from sf2dist.data.shards import Manifest, ShardFormatError, read_manifest

__all__ = ["Manifest", "ShardFormatError", "ShardLoader", "make_loader", "read_manifest"]
