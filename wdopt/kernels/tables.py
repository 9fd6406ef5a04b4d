"""Device-side tensor tables: the memory-movement plan shared by the multi-tensor GPU kernels.

A step updates many tensors of one (device, dtype) with one launch: the host packs a table with
one row per tensor (the addresses of its parameter, gradient and state tensors, any per-tensor
flags, and its element count in the last column), and a list of work items, one per
(tensor, chunk) pair encoded as ``row << 32 | chunk``. Program ``i`` takes work item ``i``.

Each bucket (known by its first address) keeps one table in a cache, replaced when its content (addresses,
flags, sizes) changes: a training loop whose tensors keep their addresses (the caching allocator
usually returns the same blocks) uploads nothing, and any number of buckets coexist without
evicting each other. A table used while a CUDA graph is being captured is kept alive for good (the
graph replays its address); one used on another stream than the one it was made on is recorded
on that stream, so its memory is not reused while a kernel there may still read it.

The step driver's fast path (wdopt/optim/_fast.py) instead owns one table per bucket, made once,
whose gradient column is rewritten in place when the gradients moved (``set_column``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

# bucket -> (content, device buffer, stream it was made on). The bound only guards against
# endless reallocation.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4096
# Tables read by a kernel captured in a CUDA graph: a graph replays the addresses it captured, and
# nothing says when it is dropped, so such a table is never freed (replacing or evicting its cache
# entry keeps it here). A few kilobytes per distinct captured step.
_CAPTURED: dict[int, torch.Tensor] = {}


class DeviceTable:
    """A device-side table of tensor addresses and sizes, with the work items that cover them.

    ``columns`` are lists of equal length, one entry per tensor: a tensor (its address is stored),
    an int (stored as is: a flag), or None (0). The element count comes from ``numels``.
    """

    def __init__(self, columns: Sequence[Sequence], numels: Sequence[int], device: torch.device, chunk: int,
                 owned: bool = False):
        """``owned``: a table for one optimizer bucket's fast path (wdopt/optim/_fast.py), outside
        the cache, whose gradient column ``set_column`` rewrites in place."""
        self.n_tensors = len(numels)
        self.ncol = len(columns) + 1
        self._owned, self._scratch, self._column_views = owned, {}, {}
        self.max_numel = max(numels, default=0)
        values = []
        misaligned = 0
        for r in range(self.n_tensors):
            for col in columns:
                v = col[r]
                if isinstance(v, torch.Tensor):
                    address = v.data_ptr()
                    if v.dim():  # 0-d tensors (step counts) are read as scalars
                        misaligned |= address % 16
                    values.append(address)
                else:
                    values.append(int(v or 0))
            values.append(numels[r])
        #: Every vector-accessed address is 16-byte aligned (torch allocations are; views may not be).
        self.aligned = not misaligned
        bucket = (device, self.ncol, chunk, values[0] if values else 0)
        content = tuple(values)
        cuda = device.type == "cuda"
        stream = torch.cuda.current_stream(device) if cuda else None
        self._stream = stream
        cached = None if owned else _CACHE.get(bucket)
        if owned:
            self._check_not_capturing(device)
            buf = self._upload(values, numels, chunk, device)
            # What each column holds now: set_column uploads a column only when it changes (a
            # step captured in a CUDA graph right after this one then uploads nothing).
            held = torch.tensor(values, dtype=torch.int64).view(self.n_tensors, self.ncol)
            self._columns = {c: held[:, c].clone() for c in range(len(columns))}
            self._captured = False
        elif cached is not None and cached[0] == content:
            _CACHE.move_to_end(bucket)
            buf = cached[1]
            if cuda and cached[2] != stream:
                # Made on another stream: the allocator must not hand its memory out again while a
                # kernel on this stream may still read it (if the entry is replaced later).
                buf.record_stream(stream)
        else:
            self._check_not_capturing(device)
            buf = self._upload(values, numels, chunk, device)
            _CACHE[bucket] = (content, buf, stream)
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        if cuda and torch.cuda.is_current_stream_capturing():
            _CAPTURED[buf.data_ptr()] = buf
        self._buffer = buf
        self.table = buf[: self.n_tensors * self.ncol]
        self.work = buf[self.n_tensors * self.ncol :]
        self.programs = self.work.numel()

    @staticmethod
    def _check_not_capturing(device: torch.device) -> None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "wdopt: the tensors of an optimizer step changed during CUDA graph capture. Run one "
                "step before capturing, and keep gradients at fixed addresses (zero_grad(set_to_none=False)).")

    def set_column(self, column: int, addresses: torch.Tensor, aligned: bool, changed: bool | None = None) -> bool:
        """Rewrite ``column`` (an owned table's) with ``addresses`` (int64, one per tensor, on the
        CPU; ``aligned``: each vector-accessed one is a multiple of 16), copied to the device only
        when they changed (``changed``: whether the caller knows they differ from the last ones
        it gave; None: compare). False, writing nothing, where the table cannot take them: an
        address that breaks the alignment the kernels were specialised for, or another stream
        than the table's (a kernel there may still read it)."""
        device = self.table.device
        if device.type == "cuda" and torch.cuda.current_stream(device) != self._stream:
            return False
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _CAPTURED[self._buffer.data_ptr()] = self._buffer  # a graph will replay its addresses
            self._captured = True
        last = self._columns.get(column)
        if changed is False or (changed is None and last is not None and torch.equal(last, addresses)):
            return True
        if self._captured:
            return False  # a captured graph replays this table: it is never rewritten
        if self.aligned and not aligned:
            return False
        self._check_not_capturing(device)
        self._write(column, addresses)
        # Copied, not kept: the caller may rewrite ``addresses`` (the step plan reuses its buffer).
        if last is not None and last.shape == addresses.shape:
            last.copy_(addresses)
        else:
            self._columns[column] = addresses.clone()
        return True

    def _write(self, column: int, addresses: torch.Tensor) -> None:
        target = self._column_views.get(column)
        if target is None:
            target = self._column_views[column] = self.table.view(self.n_tensors, self.ncol)[:, column]
        if target.is_cuda:
            target.copy_(addresses.pin_memory(), non_blocking=True)  # ordered after the last step's kernels
        else:
            target.copy_(addresses)

    def scratch(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A work buffer of a launch with this table (say per-tensor coefficients): an owned
        table's own, kept from step to step (allocated once, at an address a captured graph may
        replay); otherwise a new one."""
        if not self._owned:
            return torch.empty(shape, dtype=dtype, device=self.table.device)
        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._scratch[name] = torch.empty(shape, dtype=dtype, device=self.table.device)
        return buffer

    @staticmethod
    def _upload(values: list[int], numels: Sequence[int], chunk: int, device: torch.device) -> torch.Tensor:
        counts = torch.tensor([(n + chunk - 1) // chunk for n in numels], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        chunks = torch.arange(rows.numel(), dtype=torch.int64) - first[rows]
        host = torch.cat([torch.tensor(values, dtype=torch.int64), (rows << 32) | chunks])
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)
