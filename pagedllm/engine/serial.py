"""msgpack framing of ``engine.messages`` over ZeroMQ, with tensors as raw buffers.

A message is a multipart ZeroMQ message: one byte naming its kind, the msgpack body, then one
frame per large array. An array (torch tensor or numpy array) is an msgpack extension holding its
dtype, shape and frame index; its bytes go out as a frame of their own without a copy and are
read back in place, so image pixels are copied once, by the kernel, not pickled.
"""

from __future__ import annotations

import enum
import warnings
from typing import Any

import msgspec
import numpy as np
import torch

from pagedllm.core import scheduler
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.engine.messages import (
    EngineCoreInfo,
    EngineCoreOutputs,
    EngineCoreRequest,
    UtilityCall,
    UtilityResult,
)
from pagedllm.multimodal.inputs import ImageFeature, MRopePositions

_ARRAY_EXT = 1
_INLINE_BYTES = 512  # smaller arrays travel inside the body


# NewRequestData names these under TYPE_CHECKING only (the scheduler imports no torch);
# msgspec resolves the annotations of what it decodes in their module.
vars(scheduler).update(ImageFeature=ImageFeature, MRopePositions=MRopePositions)


class StepMessage(msgspec.Struct, array_like=True, gc=False):
    """Engine core -> tensor-parallel workers: a step to launch (None: stop), after freeing
    the requests that finished since the last one."""

    freed: list[str]
    sched: SchedulerOutput | None


class Kind(bytes, enum.Enum):
    # front end -> core
    ADD = b"A"
    ABORT = b"X"
    UTILITY = b"U"
    SHUTDOWN = b"S"
    # core -> front end
    READY = b"R"
    OUTPUTS = b"O"
    RESULT = b"V"
    FAILED = b"F"  # the core could not start, or died: a message for the user
    # core -> tensor-parallel workers
    STEP = b"P"


_TYPES: dict[Kind, Any] = {
    Kind.ADD: EngineCoreRequest,
    Kind.ABORT: list[str],
    Kind.UTILITY: UtilityCall,
    Kind.SHUTDOWN: None,
    Kind.READY: EngineCoreInfo,
    Kind.OUTPUTS: EngineCoreOutputs,
    Kind.RESULT: UtilityResult,
    Kind.FAILED: str,
    Kind.STEP: StepMessage,
}


class Encoder:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._frames: list[Any] = []

    def encode(self, kind: Kind, message: Any) -> list[Any]:
        """The frames of one message (send them with ``send_multipart(copy=False)``)."""
        self._frames = [kind.value, b""]
        try:
            self._frames[1] = self._encoder.encode(message)
            return self._frames
        finally:
            self._frames = []

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise TypeError("only CPU tensors cross the engine boundary")
            torch_dtype = str(obj.dtype).removeprefix("torch.")
            obj = obj.contiguous()
            # numpy has no bfloat16: its bits travel as int16
            obj = (obj.view(torch.int16) if obj.dtype == torch.bfloat16 else obj).numpy()
        elif isinstance(obj, np.ndarray):
            torch_dtype = None
            obj = np.ascontiguousarray(obj)
        else:
            raise NotImplementedError(f"cannot encode {type(obj).__name__}")
        data = obj.data.cast("B") if obj.ndim else obj.tobytes()
        index = -1
        if obj.nbytes >= _INLINE_BYTES:
            index = len(self._frames)
            self._frames.append(data)
            data = b""
        header = msgspec.msgpack.encode((obj.dtype.str, obj.shape, torch_dtype, index))
        return msgspec.msgpack.Ext(_ARRAY_EXT, len(header).to_bytes(4, "little") + header
                                   + bytes(data))


class Decoder:
    def __init__(self) -> None:
        self._decoders = {kind: msgspec.msgpack.Decoder(t, dec_hook=_dec_hook,
                                                        ext_hook=self._ext_hook)
                          for kind, t in _TYPES.items() if t is not None}
        self._frames: list[Any] = []

    def decode(self, frames: list[Any]) -> tuple[Kind, Any]:
        kind = Kind(bytes(frames[0]))
        if kind not in self._decoders:
            return kind, None
        self._frames = frames
        try:
            return kind, self._decoders[kind].decode(frames[1])
        finally:
            self._frames = []

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != _ARRAY_EXT:
            raise ValueError(f"unknown msgpack extension {code}")
        size = int.from_bytes(data[:4], "little")
        dtype, shape, torch_dtype, index = msgspec.msgpack.decode(data[4:4 + size])
        buffer = data[4 + size:] if index < 0 else memoryview(self._frames[index])
        array = np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
        if torch_dtype is None:
            return array
        with warnings.catch_warnings():  # read-only frames: the engine never writes inputs
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array).view(getattr(torch, torch_dtype))


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ in (torch.Tensor, np.ndarray) and isinstance(obj, type_):
        return obj
    raise NotImplementedError(f"cannot decode {type_}")
