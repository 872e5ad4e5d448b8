"""The KV cache and its one owner: every change to which slots are in use, and how long each row is, goes
through the verbs of KVCache (admit, extend, advance, truncate, release, reshape).

The forward pass (workers.decoder) only writes K/V values at positions the cache gives it and reads views
of them; the scheduler (workers.scheduler) decides which rows come and go. Nothing else writes `rows` or
`lengths`.

In order: KVCache (layout, the verbs) -> compaction (which slot a row moves to when others leave).
"""
from __future__ import annotations

import torch
from torch import Tensor


CPU_BUDGET_TOKENS = 65536
"""The KV budget on a CPU when none is set (the machine's RAM is shared with everything else)..."""
CPU_BUDGET_BYTES = 1 << 30
"""... unless that many tokens of this model's K/V would take more than this (a float32 model's K/V takes twice
a bfloat16 one's: the budget follows bytes, so a worker's memory does not double with its dtype)."""
GPU_MEMORY_FRACTION = 0.9
"""Of a GPU's memory still free once the model is loaded, the share the KV cache may take."""
KEYS_BY_POSITION = frozenset({"cuda"})
"""Device types whose cache stores each head's keys position by position (keys, head_dim), as fused attention
kernels read them (workers.attention); elsewhere (a CPU) transposed (head_dim, keys), which the query-key product
reads in place."""


def kv_budget_tokens(device: torch.device, bytes_per_token: int | None, requested: int | None = None) -> int:
    """How many tokens of K/V the running rows may hold: `requested` when set (the kv_cache_tokens setting);
    on a GPU, what GPU_MEMORY_FRACTION of its free memory holds; else CPU_BUDGET_TOKENS, or what CPU_BUDGET_BYTES
    holds if that is fewer."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"the KV cache budget must be at least 1 token, got {requested}")
        return requested
    if device.type == "cuda" and bytes_per_token:
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * GPU_MEMORY_FRACTION) // bytes_per_token)
    if bytes_per_token:
        return max(1, min(CPU_BUDGET_TOKENS, CPU_BUDGET_BYTES // bytes_per_token))
    return CPU_BUDGET_TOKENS


def compaction(rows: int, leaving: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Which old slot each remaining row comes from when the rows in `leaving` leave a batch of `rows` rows.

    Returns (order, moves): order[i] is the old slot of the row that ends in slot i; moves are the
    (src, dst) copies that make it so. Rows beyond the new size fill the freed slots below it, so few rows
    move and the remaining ones stay contiguous in slots 0..rows-len(leaving)-1.
    """
    gone = set(leaving)
    assert len(gone) == len(leaving) and all(0 <= slot < rows for slot in gone), f"bad slots {leaving} of {rows} rows"
    keep = rows - len(gone)
    holes = sorted(slot for slot in gone if slot < keep)
    movers = [slot for slot in range(keep, rows) if slot not in gone]
    order = list(range(keep))
    for hole, src in zip(holes, movers, strict=True):
        order[hole] = src
    return order, list(zip(movers, holes))


class KVCache:
    """K and V of every layer for up to `slots` rows of up to `capacity` tokens each.

    keys: (layers, slots, kv_heads, head_dim, capacity), indexed transposed. How they are stored depends on who
    reads them: on a CPU transposed too, so that a step's query-key product reads them in place (in bfloat16 a
    product over the other layout copies them first, 3x slower); where fused attention kernels read them
    (KEYS_BY_POSITION: CUDA), position by position, as values are, and `keys` is a transposed view of that storage.
    Every verb indexes `keys` the same way either way. values: (layers, slots, kv_heads, capacity, head_dim). The running batch occupies slots 0..rows-1, with
    no gaps: when rows leave, the last rows move into their slots (release), so that every step reads one
    contiguous view. lengths[r] is how many tokens slot r holds; row r's next token goes to position lengths[r].

    The base: one shared prefix (a job's system prompt) held once for every row that starts with it, instead of
    once per slot. offsets[r] is how many of the base's first positions row r uses (0: none); its slot then holds
    its tokens from position offsets[r] on, at slot positions 0.., so its whole length is offsets[r] + lengths[r].
    The forward pass reads the base once for all rows (workers.attention.cascade_attention).

    host_lengths and host_offsets mirror lengths and offsets of the slots in use, kept by the same verbs: what the
    host needs to know of the rows' lengths (how far attention reaches, which slots move) it reads there, so that
    a decode step never waits for the device to answer (workers.syncs).
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int, dtype: torch.dtype, device: torch.device,
        keys_by_position: bool | None = None,
    ) -> None:
        """keys_by_position: how keys are stored (see the class); None: as KEYS_BY_POSITION says for the device."""
        device = torch.device(device)
        self.keys_by_position = device.type in KEYS_BY_POSITION if keys_by_position is None else keys_by_position
        self.keys = self._keys_tensor((layers, slots, kv_heads, head_dim, capacity), dtype, device)
        self.values = torch.zeros((layers, slots, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.offsets = torch.zeros(slots, dtype=torch.long, device=device)
        self.base_keys = self._keys_tensor((layers, kv_heads, head_dim, 0), dtype, device)
        self.base_values = torch.zeros((layers, kv_heads, 0, head_dim), dtype=dtype, device=device)
        self._rows = 0
        self.host_lengths: list[int] = []
        self.host_offsets: list[int] = []

    # --- what it holds ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Slots in use: 0..rows-1."""
        return self._rows

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.values.shape[3]

    @property
    def free(self) -> int:
        return self.slots - self._rows

    @property
    def base_length(self) -> int:
        return self.base_values.shape[2]

    @property
    def uses_base(self) -> bool:
        """Some row in use reads the base."""
        return any(self.host_offsets)

    @property
    def longest(self) -> int:
        """The most tokens a slot in use holds (0 when none is in use)."""
        return max(self.host_lengths, default=0)

    def nbytes(self) -> int:
        return 2 * (self.keys.numel() + self.base_keys.numel()) * self.keys.element_size()

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token in every layer."""
        return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def _keys_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Zeros of `shape` (..., head_dim, positions), stored as this cache stores keys."""
        if not self.keys_by_position:
            return torch.zeros(shape, dtype=dtype, device=device)
        return torch.zeros((*shape[:-2], shape[-1], shape[-2]), dtype=dtype, device=device).transpose(-1, -2)

    def _laid_out(self, keys: Tensor) -> Tensor:
        """keys (..., head_dim, positions) stored as this cache stores keys (a copy when they are not)."""
        if self.keys_by_position and keys.stride(-2) != 1:
            return keys.transpose(-1, -2).contiguous().transpose(-1, -2)
        if not self.keys_by_position and keys.stride(-1) != 1:
            return keys.contiguous()
        return keys

    # --- the verbs ---------------------------------------------------------------------------------

    def admit(self, starts: list[int], offsets: list[int] | None = None) -> int:
        """Take the next len(starts) free slots for new rows whose first starts[i] tokens are already in their slot
        (0 for a row prefilled from its first token), after the first offsets[i] positions of the base (none when
        None); returns the first slot. Their K/V are then written with write() at slot positions starts[i]..,
        and extend() records them."""
        count = len(starts)
        offsets = offsets or [0] * count
        assert count <= self.free, f"admitting {count} rows into a cache with {self.free} free slots"
        assert all(0 <= s <= self.capacity for s in starts), f"start positions {starts} beyond capacity {self.capacity}"
        assert all(0 <= o <= self.base_length for o in offsets), f"base offsets {offsets} beyond its {self.base_length}"
        first = self._rows
        self.lengths[first : first + count] = torch.tensor(starts, dtype=torch.long, device=self.lengths.device)
        self.offsets[first : first + count] = torch.tensor(offsets, dtype=torch.long, device=self.lengths.device)
        self._rows += count
        self.host_lengths += starts
        self.host_offsets += offsets
        return first

    def extend(self, first: int, counts: list[int]) -> None:
        """Rows first.. hold counts[i] more tokens each (written by a prefill)."""
        added = torch.tensor(counts, dtype=torch.long, device=self.lengths.device)
        end = first + len(counts)
        assert end <= self._rows, f"extending slots {first}..{end - 1} of {self._rows} rows"
        self.lengths[first:end] += added
        self.host_lengths[first:end] = [n + c for n, c in zip(self.host_lengths[first:end], counts)]
        assert max(self.host_lengths[first:end]) <= self.capacity, "a row outgrew the cache's capacity"

    def advance(self) -> None:
        """Every row in use holds one more token (a decode step wrote it at its old length)."""
        self.lengths[: self._rows] += 1
        self.host_lengths = [n + 1 for n in self.host_lengths]

    def truncate(self, slot: int, length: int) -> None:
        """Forget slot's tokens from position `length` on (rejected draft tokens); they are overwritten later."""
        assert 0 <= slot < self._rows, f"slot {slot} is not in use ({self._rows} rows)"
        assert 0 <= length <= self.host_lengths[slot], f"truncating slot {slot} to {length} > {self.host_lengths[slot]}"
        self.lengths[slot] = length
        self.host_lengths[slot] = length

    def release(self, slots: list[int]) -> list[int]:
        """The rows in `slots` leave; the last rows move into the freed slots. Returns `order` (see compaction):
        order[i] is the old slot of the row now in slot i, so callers can keep their per-row state in step."""
        order, moves = compaction(self._rows, slots)
        for src, dst in moves:
            n = self.host_lengths[src]
            self.keys[:, dst, :, :, :n] = self.keys[:, src, :, :, :n]
            self.values[:, dst, :, :n] = self.values[:, src, :, :n]
            self.lengths[dst] = n
            self.offsets[dst] = self.offsets[src]
        self._rows = len(order)
        self.lengths[self._rows :] = 0
        self.offsets[self._rows :] = 0
        self.host_lengths = [self.host_lengths[i] for i in order]
        self.host_offsets = [self.host_offsets[i] for i in order]
        return order

    def clear(self) -> None:
        """Every row leaves (the memory is kept)."""
        self._rows = 0
        self.lengths.zero_()
        self.offsets.zero_()
        self.host_lengths, self.host_offsets = [], []

    def set_base(self, keys: Tensor, values: Tensor) -> None:
        """Hold keys (layers, kv_heads, head_dim, P) and values (layers, kv_heads, P, head_dim) as the base (keys
        stored as the cache stores its own: a copy when they are not); only while no row uses the old one."""
        assert not self.uses_base, "replacing the base while rows read it"
        self.base_keys, self.base_values = self._laid_out(keys), values

    def rebase(self, slot: int, offset: int) -> None:
        """Slot's first `offset` tokens equal the base's (the caller knows by their prefix-cache keys): drop them
        from the slot, which then holds the rest from slot position 0, and read them from the base."""
        n = self.host_lengths[slot]
        assert self.host_offsets[slot] == 0 and 0 < offset <= min(n, self.base_length), f"rebasing slot {slot} by {offset}"
        self.keys[:, slot, :, :, : n - offset] = self.keys[:, slot, :, :, offset:n].clone()
        self.values[:, slot, :, : n - offset] = self.values[:, slot, :, offset:n].clone()
        self.lengths[slot] = n - offset
        self.offsets[slot] = offset
        self.host_lengths[slot], self.host_offsets[slot] = n - offset, offset

    def read(self, slot: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """K (layers, kv_heads, head_dim, end - start) and V of slot's row at its positions start..end-1, all in the
        base or all in the slot (views, no copy)."""
        offset = self.host_offsets[slot]
        if end <= offset:
            return self.base_keys[..., start:end], self.base_values[:, :, start:end]
        assert start >= offset, f"positions {start}..{end} straddle slot {slot}'s base of {offset}"
        return self.keys[:, slot, :, :, start - offset : end - offset], self.values[:, slot, :, start - offset : end - offset]

    def place(self, slot: int, start: int, keys: Tensor, values: Tensor) -> None:
        """Write K (layers, kv_heads, head_dim, n) and V at slot's row positions start.. (after its base)."""
        offset = self.host_offsets[slot]
        assert start >= offset, f"position {start} of slot {slot} is in its base of {offset}"
        n = values.shape[2]
        self.keys[:, slot, :, :, start - offset : start - offset + n] = keys
        self.values[:, slot, :, start - offset : start - offset + n] = values

    def reshaped(self, slots: int, capacity: int) -> KVCache:
        """A cache of another shape holding the same rows (each must fit the new capacity), for when the
        rows' lengths change enough that another split of the same memory into slots fits better."""
        assert self._rows <= slots, f"{self._rows} rows do not fit {slots} slots"
        longest = self.longest
        assert longest <= capacity, f"a row of {longest} tokens does not fit a capacity of {capacity}"
        layers, _, kv_heads, head_dim, _ = self.keys.shape
        other = KVCache(layers, kv_heads, head_dim, slots, capacity, self.keys.dtype, self.keys.device, self.keys_by_position)
        if self._rows:
            n = min(capacity, self.capacity)
            other.keys[:, : self._rows, :, :, :n] = self.keys[:, : self._rows, :, :, :n]
            other.values[:, : self._rows, :, :n] = self.values[:, : self._rows, :, :n]
            other.lengths[: self._rows] = self.lengths[: self._rows]
            other.offsets[: self._rows] = self.offsets[: self._rows]
            other._rows = self._rows
            other.host_lengths, other.host_offsets = list(self.host_lengths), list(self.host_offsets)
        other.base_keys, other.base_values = self.base_keys, self.base_values
        return other

    # --- what the forward pass reads and writes ------------------------------------------------------

    def write(self, layer: int, first: int, k: Tensor, v: Tensor, positions: Tensor | None, real: Tensor | None = None) -> None:
        """Store k, v (rows, kv_heads, tokens, head_dim) of slots first.. at positions (rows, tokens), or at
        0..tokens-1 when positions is None (a prefill from the first token: one slice copy). real (rows, tokens),
        when given, says which of them to store (a padded chunk's pads are not)."""
        rows, _, tokens, _ = k.shape
        if positions is None:
            self.keys[layer, first : first + rows, :, :, :tokens] = k.transpose(-1, -2)
            self.values[layer, first : first + rows, :, :tokens] = v
            return
        slot = torch.arange(first, first + rows, device=k.device)[:, None].expand(rows, tokens)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (rows, tokens, kv_heads, d): how the index lays them out
        if real is not None:
            slot, positions, k, v = slot[real], positions[real], k[real], v[real]
        self.keys[layer, slot, :, :, positions] = k
        self.values[layer, slot, :, positions] = v

    def view(self, layer: int, first: int, rows: int, length: int) -> tuple[Tensor, Tensor]:
        """K transposed (rows, kv_heads, head_dim, length) and V (rows, kv_heads, length, head_dim) of slots
        first..first+rows-1, positions 0..length-1: views, no copy (K's strides as the cache stores it)."""
        return self.keys[layer, first : first + rows, :, :, :length], self.values[layer, first : first + rows, :, :length]
