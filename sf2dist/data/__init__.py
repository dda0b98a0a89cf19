"""Data layer: the shard format, converters into it, the training loader, synthetic identities.

- `shards`: webdataset shards + per-shard index + manifest.json, and the output-dir policy;
- `recordio`: reading InsightFace .rec/.idx files without mxnet;
- `convert`: `sf2dist-convert rec|folder`, sources -> shards with rejects and reconciled counts;
- `loader`: `make_loader`, one rank's batches with an exact, seeded, resumable split;
- `stream`: the same contract for shards streamed from URLs or `pipe:` commands (make_loader
  chooses it from the form of data.train; `train_manifest` reads either kind's manifest);
- `synth`: `sf2dist-synth`, procedural face-like identities and a held-out verification set.
"""
from sf2dist.data.loader import ShardLoader, make_loader
from sf2dist.data.shards import Manifest, ShardFormatError, read_manifest
from sf2dist.data.stream import ShardReadError, is_stream_source, train_manifest

__all__ = ["Manifest", "ShardFormatError", "ShardLoader", "ShardReadError", "is_stream_source", "make_loader",
           "read_manifest", "train_manifest"]
