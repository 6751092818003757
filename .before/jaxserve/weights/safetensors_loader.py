"""Local HF checkpoint directories: config.json + one or many *.safetensors (with the index file).

The safetensors header is parsed here and tensors are memory-mapped, so nothing is read until the
assembler asks for it, bf16 needs no framework, and a truncated file is caught per tensor with the
file and tensor named.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxserve.weights.assemble import WeightError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise WeightError(f"{path}: file not found")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightError(f"{path}: truncated (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self.size = size
        self._mm = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise WeightError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if self.data_start + end > self.size:
            raise WeightError(f"{self.path}: truncated: tensor '{name}' ends at byte "
                              f"{self.data_start + end}, file has {self.size}")
        shape = tuple(info["shape"])
        if (end - start) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize:
            raise WeightError(f"{self.path}: tensor '{name}' byte size does not match shape {shape}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self.data_start + start:self.data_start + end].view(dt).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, looked up by name across shards."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not files:
                raise WeightError(f"{model_dir}: no *.safetensors files (and no index file)")
            weight_map = None
        self.files = {f: SafetensorsFile(os.path.join(model_dir, f)) for f in files}
        self.location: dict[str, str] = {}
        for fname, sf in self.files.items():
            for k in sf.keys():
                self.location[k] = fname
        if weight_map is not None:
            for k, fname in weight_map.items():
                if self.location.get(k) != fname:
                    raise WeightError(f"{os.path.join(model_dir, fname)}: tensor '{k}' listed in the "
                                      "index is not in that file")

    def get(self, name: str) -> np.ndarray:
        return self.files[self.location[name]].get(name)  # KeyError when absent

    def where(self, name: str) -> str:
        f = self.location.get(name)
        return os.path.join(self.dir, f) if f else self.dir
