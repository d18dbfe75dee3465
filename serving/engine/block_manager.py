"""The paged KV cache's accounting: fixed-size blocks from one pool, a block table per sequence, prefix hashes.

Pure bookkeeping beside the scheduler (no torch, threads or locks), in the shape of nano-vLLM's and vLLM v1's block
managers; `tests/serving/test_block_manager.py` drives it with made-up tokens.

- The cache is `num_blocks` blocks of `block_size` tokens. A sequence's K/V at position p lives in block
  `block_table[p // block_size]`, row `p % block_size`; the model runner reads and writes through that table.
- A request is admitted when its prompt's blocks fit (`can_allocate`, `allocate`): blocks for the prompt and for the
  first generated token, so the decode row laid out in the step that finishes the prompt always has its block. A
  decoding sequence takes one more block as it crosses into it (`append_slot`); when none is free the scheduler
  preempts a request (a scheduler rule). `free` gives an ended request's blocks back.
- Automatic prefix caching: a full block is named by the hash of its tokens and of its prefix's hash (`block_hash`),
  registered once its K/V are written or launched (`cache_full_blocks`). A block whose last holder ends keeps its
  K/V and its hash in a least-recently-used list; a new request whose prompt starts with the same full blocks takes
  them (reference counts, shared with any running holder) and prefills only the rest. A free block is taken from
  the never-hashed ones first, then by evicting the least recently used cached one. A hit compares the tokens too,
  so a hash collision can never serve another prefix's K/V.
- Rows: the engine still decodes in rows (its batch buckets and CUDA graphs), one per running request, `slot`; the
  lowest free row goes first, so a small batch stays in the smallest bucket. Rows cost no KV memory.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from typing import Protocol

DEFAULT_BLOCK_SIZE = 16
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Block sizes the engine accepts: powers of two that divide the decode step's KV-length buckets (multiples of 256),
so a step's K/V is whole blocks."""


def block_hash(parent: int | None, tokens: Seq[int]) -> int:
    """The name of a full block: its tokens and everything before them (through the parent block's hash)."""
    return hash((parent, tuple(tokens)))


class BlockSequence(Protocol):
    """What the block manager reads and writes on a sequence (`serving.engine.scheduler.Sequence`)."""

    slot: int
    block_table: list[int]
    prefix_hashes: list[int]

    @property
    def prefill_tokens(self) -> Seq[int]: ...


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        """Set once the block is full and registered in the prefix cache."""
        self.tokens: tuple[int, ...] = ()
        """The block's own tokens, kept with the hash to refuse a collision."""


class BlockManager:
    """KV blocks and decode rows for the scheduler; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, num_slots: int = 1, *,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError("num_blocks, block_size and num_slots must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(index) for index in range(num_blocks)]
        self._free_ids: deque[int] = deque(range(num_blocks))
        """Free blocks holding nothing reusable."""
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        """Free blocks that keep a registered prefix, least recently used first (evicted first)."""
        self._by_hash: dict[int, int] = {}
        """Registered prefix hash -> block id, held or free."""
        self._free_slots = list(range(num_slots))
        self.num_used_blocks = 0
        self.queried_tokens = 0
        """Prompt tokens looked up in the prefix cache at admission, since the start (a counter for metrics)."""
        self.hit_tokens = 0
        """Of those, tokens found cached and not prefilled again."""

    # ------------------------------------------------------------------------------------ capacity

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids) + len(self._cached_free)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        """Blocks held by running requests, as a fraction of the pool (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------ admission

    def cached_prefix(self, seq: BlockSequence) -> list[int]:
        """The blocks of the longest cached prefix of `seq`'s prefill tokens, leaving at least its last token to
        compute (its logits choose the next token)."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.prefill_tokens
        size = self.block_size
        hits: list[int] = []
        parent = None
        for index in range((len(tokens) - 1) // size):
            block_tokens = tuple(tokens[index * size : (index + 1) * size])
            parent = block_hash(parent, block_tokens)
            block_id = self._by_hash.get(parent)
            if block_id is None or self.blocks[block_id].tokens != block_tokens:
                break
            hits.append(block_id)
        return hits

    def _blocks_needed(self, seq: BlockSequence, hits: list[int]) -> int:
        """Free blocks `allocate` would take: the new ones, and the cached free ones it revives."""
        fresh = self.blocks_for(len(seq.prefill_tokens) + 1) - len(hits)
        revived = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        return fresh + revived

    def can_allocate(self, seq: BlockSequence) -> bool:
        if not self._free_slots:
            return False
        return self._blocks_needed(seq, self.cached_prefix(seq)) <= self.num_free_blocks

    def allocate(self, seq: BlockSequence) -> int:
        """Give `seq` a row and the blocks of its prefill tokens plus one: the cached prefix shared, the rest new.
        Returns how many of its tokens are cached (a multiple of block_size), which it need not prefill."""
        hits = self.cached_prefix(seq)
        if not self._free_slots or self._blocks_needed(seq, hits) > self.num_free_blocks:
            raise RuntimeError("allocate() without can_allocate(): not enough free KV blocks or rows")
        for block_id in hits:
            self._take(block_id)
        table = list(hits)
        for _ in range(self.blocks_for(len(seq.prefill_tokens) + 1) - len(hits)):
            table.append(self._take_free())
        seq.block_table = table
        seq.prefix_hashes = [self.blocks[block_id].hash for block_id in hits]  # type: ignore[misc]
        seq.slot = heapq.heappop(self._free_slots)
        cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.queried_tokens += len(seq.prefill_tokens)
            self.hit_tokens += cached
        return cached

    def append_slot(self, seq: BlockSequence, position: int) -> bool:
        """Make sure the block for `position` is in `seq`'s table (taking a free one as it grows into a new block);
        False when no block is free."""
        table = seq.block_table
        while len(table) * self.block_size <= position:
            if not self.num_free_blocks:
                return False
            table.append(self._take_free())
        return True

    # ------------------------------------------------------------------------------------ the prefix cache

    def cache_full_blocks(self, seq: BlockSequence, tokens: Seq[int], num_tokens: int) -> None:
        """Register `seq`'s full blocks among its first `num_tokens` tokens (`tokens`, their K/V written or in a
        launched pass) in the prefix cache. Idempotent: blocks already registered are passed over."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        hashes = seq.prefix_hashes
        full = min(num_tokens // size, len(seq.block_table))
        while len(hashes) < full:
            index = len(hashes)
            block_tokens = tuple(tokens[index * size : (index + 1) * size])
            value = block_hash(hashes[-1] if hashes else None, block_tokens)
            hashes.append(value)
            block = self.blocks[seq.block_table[index]]
            if block.hash is not None:  # a shared block, registered by the request it came from
                continue
            if value in self._by_hash:  # the same prefix computed twice (two requests in flight): keep the first
                continue
            block.hash, block.tokens = value, block_tokens
            self._by_hash[value] = block.block_id

    # ------------------------------------------------------------------------------------ freeing

    def free(self, seq: BlockSequence) -> None:
        """Give back `seq`'s row and its hold on its blocks; a block no one holds any more keeps its prefix for reuse
        (most recently used last) or, holding none, goes back to the free blocks."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.num_used_blocks -= 1
                if block.hash is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free_ids.append(block_id)
        seq.block_table = []
        seq.prefix_hashes = []
        if seq.slot >= 0:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1

    # ------------------------------------------------------------------------------------ internals

    def _take(self, block_id: int) -> None:
        """Hold a registered block (shared with its other holders, or revived from the cached free ones)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
            self.num_used_blocks += 1
        block.ref_count += 1

    def _take_free(self) -> int:
        """A free block for new K/V: a never-hashed one, else the least recently used cached one, evicted."""
        if self._free_ids:
            block_id = self._free_ids.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self.blocks[block_id]
            del self._by_hash[block.hash]  # type: ignore[arg-type]
            block.hash, block.tokens = None, ()
        self.blocks[block_id].ref_count = 1
        self.num_used_blocks += 1
        return block_id
