"""Preprocessing library: manifests, video decoding, face detection and alignment, face shards.

Everything here is importable without Ray; the Ray Data graph lives in `pipeline.preprocess`.
"""
