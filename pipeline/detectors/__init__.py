"""One module per face detector (mtcnn.py, scrfd.py) over the shared pieces in base.py.

Each detector module holds its class and its own frozen settings dataclass; the registry that names
them (`--detector-name`) is the list of detector fields of `pipeline.detect.DetectorConfig`.
"""
